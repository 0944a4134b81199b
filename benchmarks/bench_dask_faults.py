"""Dask faults at length: worker processes killed again and again during one run,
then the scheduler closed mid-run and the run resumed in one process.

    python benchmarks/bench_dask_faults.py                 # 4096 spectra, 6 kills
    python benchmarks/bench_dask_faults.py --n 1024 --kills 4 --json out.json

Issue 17, part 3 ("on a LocalCluster with two workers, kill a worker process in the
middle of a chunk: the chunk is fitted again elsewhere, nothing lost or duplicated;
the scheduler goes away: the run stops with a clear error and a later run resumes
from the parts on disk"), the long version of tests/test_scale.py's two tests, with
the real 5-label Payne network (7214 pixels):

1. writes an ``--n``-spectrum catalog (``bench_scale.make_catalog``, S/N 50) and fits
   it in this process: the reference table;
2. fits it on a 2-process LocalCluster while a thread kills (SIGKILL) a random worker
   process every ``--every`` s until ``--kills`` kills landed (the nanny restarts
   each; the chunks on it are fitted again on the others), and checks the table;
3. fits it again on a new cluster and closes the scheduler once a third of the
   chunks are recorded: the run must raise ``SchedulerLostError``; then the same call
   without a cluster resumes, and the table is checked.

Prints the counts: kills landed, chunks sent again, rows checked, mismatches (0).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the siblings as benchmarks.*
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"

from .bench_catalog import load_emulator, payne_available  # noqa: E402
from .bench_scale import make_catalog, same_results  # noqa: E402


class _Count(logging.Handler):
    """Counts payne_lite's 'sending it again' warnings (chunks sent again)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.n = 0

    def emit(self, record):
        self.n += "sending it again" in record.getMessage()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--chunk-size", type=int, default=128)
    ap.add_argument("--kills", type=int, default=6)
    ap.add_argument("--every", type=float, default=4.0, help="seconds between kills")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--emulator",
        choices=("payne", "default"),
        default="payne" if payne_available() else "default",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    import payne_lite as pl
    from payne_lite.catalog import local_client, parts_folder

    emu, pixel_mask, what = load_emulator(args.emulator)
    count = _Count()
    logging.getLogger("payne_lite").addHandler(count)
    rng = random.Random(args.seed)
    res = {"n_spec": args.n, "chunk_size": args.chunk_size, "emulator": what}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cat = tmp / "catalog.h5"
        make_catalog(cat, emu, pixel_mask, args.n, 50.0, args.seed)
        kw = dict(chunk_size=args.chunk_size, progress=False)
        t0 = time.perf_counter()
        ref = pl.fit_catalog(cat, tmp / "ref.fits", emu, **kw)
        res["reference_seconds"] = round(time.perf_counter() - t0, 1)
        print(f"{args.n} spectra ({what}): reference in {res['reference_seconds']} s")

        # 1. worker processes killed during the run
        kills, done = [], threading.Event()
        with local_client(2) as client:

            def killer():
                while len(kills) < args.kills and not done.wait(args.every):
                    try:  # the live workers' pids (one may be restarting)
                        pids = list(client.run(os.getpid, on_error="ignore").values())
                        pid = rng.choice([p for p in pids if isinstance(p, int)])
                        os.kill(pid, signal.SIGKILL)
                        kills.append(pid)
                    except (OSError, IndexError, TimeoutError):
                        pass  # no live worker now: try at the next tick

            thread = threading.Thread(target=killer, daemon=True)
            thread.start()
            t0 = time.perf_counter()
            out = tmp / "killed.fits"
            pl.fit_catalog(cat, out, emu, client=client, **kw)
            done.set()
            thread.join()
            seconds = time.perf_counter() - t0
        got = pl.read_results(out)
        res["worker_kills"] = len(kills)
        res["chunks_sent_again"] = count.n
        res["kills_run_seconds"] = round(seconds, 1)
        res["kills_rows_once"] = list(got["id"]) == list(ref["id"])
        res["kills_equal_reference"] = same_results(got, ref)
        print(f"worker kills: {len(kills)} in {seconds:.0f} s, {count.n} chunks sent "
              f"again; every row once: {res['kills_rows_once']}; equal to the "
              f"reference: {res['kills_equal_reference']}")  # fmt: skip

        # 2. the scheduler closed mid-run, then resumed in this process
        out = tmp / "lost.fits"
        manifest = parts_folder(out) / "manifest.json"
        n_chunks = -(-args.n // args.chunk_size)
        error = None
        with local_client(2) as client:
            cluster = client.cluster

            def closer():
                while True:
                    try:
                        if (
                            len(json.loads(manifest.read_text())["done"])
                            >= n_chunks // 3
                        ):
                            break
                    except (OSError, ValueError, KeyError):
                        pass
                    time.sleep(0.05)
                cluster.sync(cluster.scheduler.close)

            thread = threading.Thread(target=closer, daemon=True)
            thread.start()
            try:
                pl.fit_catalog(cat, out, emu, client=client, **kw)
            except pl.SchedulerLostError as err:
                error = str(err)
            thread.join()
        kept = len(list(parts_folder(out).glob("chunk-*.h5")))
        table = pl.fit_catalog(cat, out, emu, **kw)
        got = pl.read_results(out)
        res["scheduler_lost_error"] = error
        res["chunks_kept"] = kept
        res["resumed_chunks"] = table.meta["n_chunks_resumed"]
        res["lost_rows_once"] = list(got["id"]) == list(ref["id"])
        res["lost_equal_reference"] = same_results(got, ref)
        print(f"scheduler closed: {'SchedulerLostError' if error else 'NO ERROR'}"
              f" ({error}); {kept} chunks kept, {res['resumed_chunks']} resumed; "
              f"every row once: {res['lost_rows_once']}; equal to the reference: "
              f"{res['lost_equal_reference']}")  # fmt: skip
    res["rows_checked"] = 2 * args.n
    ok = (
        res["kills_rows_once"] and res["kills_equal_reference"] and error is not None
        and kept == res["resumed_chunks"] > 0 and res["lost_rows_once"]
        and res["lost_equal_reference"]
    )  # fmt: skip
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
