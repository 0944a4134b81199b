"""Kills at any moment: a real-network catalog run killed (SIGKILL) again and again,
resumed each time, ends with the table of an uninterrupted run.

    python benchmarks/bench_kills.py                   # 2048 spectra, >= 12 kills
    python benchmarks/bench_kills.py --n 1024 --kills 10 --json out.json

What it does (issue 17, part 2: "a test that kills a real-network catalog run at many
random moments (at least 10 kills in one run, including during the final merge) and
resumes each time: every row exactly once, results identical to an uninterrupted
run"):

1. Writes an ``--n``-spectrum catalog of noisy spectra (S/N 50) of the real 5-label
   Payne network (7214 APOGEE pixels; ``--emulator default`` without that data) and
   saves the emulator to a file.
2. Runs ``payne-lite fit`` on it twice, uninterrupted: the first compiles (and
   fills the persistent compilation cache) and is the reference table; the second,
   which must give the same table, is timed as the killed runs will run (start-up,
   seconds per chunk).
3. Starts the same command again and again on another output, killing it with
   SIGKILL at a random moment (a quarter in start-up, uniform over the timed run's
   start-up; the rest once the run has recorded 1 or 2 more chunks, plus a random
   share of a chunk's time: mid-chunk, mid-write; a run that reaches its merge
   first is killed there), until ``--kills`` kills have landed; the last
   ``--merge-kills`` of them wait until every chunk is recorded and kill during the
   final merge and write (0-0.5 s after the manifest lists every chunk). Then the
   command runs to the end.
4. Checks the final table: the reference's columns, every row exactly once in
   order, every value bit for bit (NaN == NaN); no temporary file is left; the
   parts folder is gone.

Prints the counts: kills landed (and during the merge), runs started, chunks fitted
in all (a killed chunk is fitted again), rows checked, mismatches (0).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: import the siblings as benchmarks.*
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"

from .bench_catalog import load_emulator, payne_available  # noqa: E402
from .bench_scale import make_catalog, same_results  # noqa: E402


def _done(manifest: Path) -> list[int]:
    try:
        return json.loads(manifest.read_text())["done"]
    except (OSError, ValueError, KeyError):
        return []


def _command(cat: Path, emu: Path, out: Path, chunk: int) -> list[str]:
    return [sys.executable, "-m", "payne_lite", "fit", str(cat), "--emulator", str(emu),
            "-o", str(out), "--chunk-size", str(chunk), "--no-progress"]  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2048, help="spectra in the catalog")
    ap.add_argument("--chunk-size", type=int, default=128)
    ap.add_argument("--kills", type=int, default=12, help="kills before the last run")
    ap.add_argument("--merge-kills", type=int, default=2, help="of them, in the merge")
    ap.add_argument("--emulator", choices=("payne", "default"), default="payne")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the counts here")
    args = ap.parse_args(argv)
    import payne_lite as pl

    which = args.emulator if payne_available() else "default"
    emu, pixel_mask, what = load_emulator(which)
    rng = np.random.default_rng(args.seed)
    n_chunks = -(-args.n // args.chunk_size)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cat, emu_path = tmp / "cat.h5", tmp / "emu.h5"
        make_catalog(cat, emu, pixel_mask, args.n, 50.0, args.seed)
        emu.save(emu_path)
        print(f"{args.n} spectra of the {what}, {n_chunks} chunks of {args.chunk_size}")

        def uninterrupted(path: Path):
            """Run to the end; returns its seconds and {chunks recorded: seconds}."""
            manifest = pl.catalog.parts_folder(path) / "manifest.json"
            t0 = time.perf_counter()
            proc = subprocess.Popen(_command(cat, emu_path, path, args.chunk_size),
                                    stdout=subprocess.DEVNULL)  # fmt: skip
            recorded = {}
            while proc.poll() is None:
                recorded.setdefault(len(_done(manifest)), time.perf_counter() - t0)
                time.sleep(0.01)
            assert proc.returncode == 0, "an uninterrupted run failed"
            return time.perf_counter() - t0, recorded

        # the first run compiles (and fills the persistent compilation cache, which
        # the later runs load from): the reference table; the second is timed, as
        # the killed runs will start, and must give the same table
        ref_path = tmp / "ref.fits"
        t_compile, _ = uninterrupted(ref_path)
        ref = pl.read_results(ref_path)
        t_ref, recorded = uninterrupted(tmp / "ref2.fits")
        repeat_same = same_results(pl.read_results(tmp / "ref2.fits"), ref)
        # start-up and the time per chunk, from when chunks were recorded: a resumed
        # run with k chunks left takes about start + k * per_chunk
        k_last = max(recorded)
        t_first = recorded.get(1, 0.5 * t_ref)
        per_chunk = (
            (recorded[k_last] - t_first) / max(k_last - 1, 1) if k_last > 1 else 0
        )
        per_chunk = per_chunk or (t_ref - t_first) / n_chunks
        t_start = max(t_first - per_chunk, 0.1 * t_first)
        print(f"uninterrupted runs: {t_compile:.1f} s compiling, {t_ref:.1f} s "
              f"(start-up ~{t_start:.1f} s, ~{per_chunk:.2f} s per chunk), same "
              f"table twice: {repeat_same}")  # fmt: skip

        out = tmp / "out.fits"
        parts = pl.catalog.parts_folder(out)
        manifest = parts / "manifest.json"
        log = open(tmp / "runs.log", "ab")  # noqa: SIM115 - one log for every run
        kills = merge_kills = runs = 0
        chunks_fitted = 0
        restarts = 0
        while kills < args.kills:
            in_merge = kills >= args.kills - args.merge_kills
            before = len(_done(manifest))
            proc = subprocess.Popen(_command(cat, emu_path, out, args.chunk_size),
                                    stdout=log, stderr=log)  # fmt: skip
            runs += 1
            if in_merge:
                while len(_done(manifest)) < n_chunks and proc.poll() is None:
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.0, 0.5))
            else:
                # a moment chosen by events, not by a clock (a resumed run starts
                # faster than the first, and a loaded machine slows everything):
                # a quarter of the kills in start-up (before the run records a
                # chunk), the rest after it records 1 or 2 more chunks and then a
                # random share of a chunk's time (mid-chunk or mid-write); a run that
                # reaches its merge first is killed there
                left = n_chunks - before
                if left <= 1 or rng.random() < 0.25:
                    target, delay = before, rng.uniform(0.0, t_start)
                else:
                    target = before + int(rng.integers(1, min(2, left - 1) + 1))
                    delay = rng.uniform(0.0, per_chunk)
                while (len(_done(manifest)) < target and proc.poll() is None):  # fmt: skip
                    time.sleep(0.01)
                deadline = time.monotonic() + delay
                while (time.monotonic() < deadline and proc.poll() is None
                       and len(_done(manifest)) < n_chunks):  # fmt: skip
                    time.sleep(0.01)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                merge_kills += int(len(_done(manifest)) == n_chunks)
            else:  # it finished first: the kills so far were not in one run
                if out.exists():
                    out.unlink()
                kills = merge_kills = chunks_fitted = 0
                restarts += 1
                print(f"  run {runs} finished before its kill: output removed, kills "
                      "counted again from 0")  # fmt: skip
            chunks_fitted += max(0, len(_done(manifest)) - before)
            print(f"  run {runs}: {'killed' if proc.returncode == -9 else 'ended'}, "
                  f"{len(_done(manifest))}/{n_chunks} chunks recorded")  # fmt: skip
        before = len(_done(manifest))
        subprocess.run(_command(cat, emu_path, out, args.chunk_size), check=True,
                       stdout=log, stderr=log)  # fmt: skip
        runs += 1
        chunks_fitted += n_chunks - before
        log.close()
        got = pl.read_results(out)
        ids = list(got["id"])
        once = ids == [f"s{i:07d}" for i in range(args.n)]
        same = same_results(got, ref) and repeat_same
        leftovers = [
            p.name
            for p in tmp.iterdir()
            if p.name.endswith(".tmp") or ".tmp." in p.name
        ]
        counts = {
            "spectra": args.n,
            "chunks": n_chunks,
            "kills": kills,
            "kills_during_merge": int(merge_kills),
            "runs": runs,
            "restarts_from_scratch": restarts,
            "chunks_recorded_by_killed_runs": chunks_fitted - (n_chunks - before),
            "rows_checked": len(ids),
            "every_row_once_in_order": once,
            "identical_to_uninterrupted": same,
            "uninterrupted_runs_identical": repeat_same,
            "parts_folder_left": parts.exists(),
            "temporary_files_left": leftovers,
        }
    print(json.dumps(counts, indent=1))
    if args.json:
        args.json.write_text(json.dumps(counts, indent=1) + "\n")
    ok = once and same and not counts["parts_folder_left"] and not leftovers
    ok = ok and kills >= args.kills
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
