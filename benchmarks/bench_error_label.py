"""Would a label-dependent emulator error calibrate the label errors better? (issue 18
item 2; measured candidates, none in the library yet)

The setup of ``bench_emulator_error.py``: The Payne's real APOGEE network makes the
spectra; a 3-hidden-unit *student* trained on 1,000 of its spectra fits them; mock
stars are shifted by a cubic spline. Each star is fitted once (``payne_lite.fit``,
``emulator_error=True``); the table's errors ("global": the sandwich with the
student's ``error_basis``, one pattern for the whole box) are compared with the
sandwich recomputed at the best fit with a label-dependent emulator error:

* ``amp``: the global basis times ``a(x)``, where ``a(x)^2`` is a quadratic in the
  scaled labels for the log of a held-out spectrum's mean squared error (fitted on
  200 held-out spectra, normalised to mean 1 over them);
* ``ens+glob``: the global basis plus the deviations of ``--members`` more students
  (other seeds, other training spectra) from the fitting one at the best fit,
  scaled so that their mean square matches the fitting student's held-out error
  (``alpha^2``).

Printed: how well the error's size is predicted over the box (``amp``), how much
of a star's own error lies in the members' span (``ens``), then coverage (fraction
of truths within 1 sigma) per label and rv for the middle 90 % of the box (the
training population) and the whole box.

    python benchmarks/bench_error_label.py --students /tmp/students   # ~15 min
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import payne_lite as pl

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_emulator_error import (  # noqa: E402
    Sandwich,
    _shift,
    train_student,
    truth_emulator,
)


def quad_features(s: np.ndarray) -> np.ndarray:
    """(n, 1 + L + L (L + 1) / 2): 1, the scaled labels and their products."""
    s = np.atleast_2d(s)
    n_lab = s.shape[1]
    cols = [np.ones(len(s))] + [s[:, j] for j in range(n_lab)]
    cols += [s[:, i] * s[:, j] for i in range(n_lab) for j in range(i, n_lab)]
    return np.column_stack(cols)


def amplitude_model(s_val, resid):
    """``a^2(s)`` from held-out residuals ``resid`` (N, P) at scaled labels ``s_val``:
    a ridge fit of log(mean squared error) on :func:`quad_features`, normalised to
    mean 1 over the held-out spectra, clipped to [0.05, 20]."""
    ms = np.mean(resid**2, axis=1)
    f = quad_features(s_val)
    beta = np.linalg.solve(f.T @ f + 1e-3 * np.eye(f.shape[1]), f.T @ np.log(ms))
    c = 1.0 / np.mean(np.exp(f @ beta))
    return lambda s: np.clip(c * np.exp(quad_features(s) @ beta), 0.05, 20.0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--n", type=int, default=100, help="stars per S/N and population")
    ap.add_argument("--snr", type=float, nargs="+", default=[300.0, 100.0, 30.0])
    ap.add_argument("--students", type=Path, help="folder to keep the students in")
    args = ap.parse_args(argv)
    truth, mask = truth_emulator()
    studs = []
    for seed in range(args.members + 1):
        path = None if args.students is None else args.students / f"stud_{seed}.h5"
        if path is not None and path.exists():
            studs.append(pl.Emulator.load(path))
            continue
        t0 = time.perf_counter()
        st = train_student(truth, n_train=1000, hidden=3, max_iter=60, seed=seed)
        print(f"student {seed} trained in {time.perf_counter() - t0:.0f} s")
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            st.save(path)
        studs.append(st)
    main_st, members = studs[0], studs[1:]
    n_lab = truth.n_labels

    def errors_at(s):
        x = truth.unscale(s)
        return np.asarray(main_st.predict(x), np.float64) - truth.predict(x)

    rng = np.random.default_rng(100)
    s_val = rng.uniform(-0.45, 0.45, (200, n_lab))
    resid = errors_at(s_val)
    a2 = amplitude_model(s_val, resid)
    s_new = rng.uniform(-0.5, 0.5, (2000, n_lab))
    ms_new = np.mean(errors_at(s_new) ** 2, axis=1)
    pred = a2(s_new) * np.mean(resid**2)
    print(
        f"amp: over 2,000 new label vectors (whole box) corr(log ms, log a^2) "
        f"{np.corrcoef(np.log(ms_new), np.log(pred))[0, 1]:.2f}, mean ms / predicted "
        f"{np.mean(ms_new / pred):.2f}; a^2 over the held-out set "
        f"{a2(s_val).min():.2f}-{a2(s_val).max():.2f}"
    )
    f_main = np.asarray(main_st.predict(truth.unscale(s_val)), np.float64)
    dev = np.stack(
        [
            np.asarray(m.predict(truth.unscale(s_val)), np.float64) - f_main
            for m in members
        ]
    )
    alpha2 = np.sum(resid**2) / (np.sum(dev**2) / len(members))
    share = []
    for i in range(len(s_val)):
        q, _ = np.linalg.qr(dev[:, i].T)
        share.append(np.sum((q.T @ resid[i]) ** 2) / np.sum(resid[i] ** 2))
    print(
        f"ens: alpha^2 {alpha2:.2f}; median share of a star's error in the members' "
        f"span {np.median(share):.2f}"
    )

    sand = Sandwich(main_st, mask)
    u_glob = np.asarray(main_st.error_basis, np.float64)
    names = (*main_st.label_names, "rv")
    print("\n| box | S/N | errors | " + " | ".join(names) + " | stars |")
    print("|---|---|---|" + "---|" * len(names) + "---|")
    for pop, half in (("middle 90 %", 0.45), ("whole", 0.5)):
        for snr in args.snr:
            rng = np.random.default_rng(1)
            labels = truth.unscale(rng.uniform(-half, half, (args.n, n_lab)))
            rv = rng.uniform(-100.0, 100.0, args.n)
            wave = sand.wave
            flux = np.stack(
                [
                    _shift(wave, f, v)
                    for f, v in zip(truth.predict(labels), rv, strict=True)
                ]
            )
            err = np.full_like(flux, 1.0 / snr)
            noisy = flux + err * rng.standard_normal(flux.shape)
            t = pl.fit(noisy, err, main_st, mask=mask)
            est = np.column_stack([np.asarray(t[n], np.float64) for n in names])
            ok = np.asarray(t["flags"]) == 0
            sig = {
                "global": np.column_stack(
                    [np.asarray(t[f"{n}_err"], np.float64) for n in names]
                ),
                "amp": np.zeros_like(est),
                "ens+glob": np.zeros_like(est),
            }
            for i in range(args.n):
                s = main_st.scale(est[i, :n_lab])
                x = est[i, :n_lab][None]
                f0 = np.asarray(main_st.predict(x), np.float64)[0]
                d = np.stack([np.asarray(m.predict(x), np.float64)[0] for m in members])
                rows = {
                    "amp": np.sqrt(a2(s[None])[0]) * u_glob,
                    "ens+glob": np.concatenate(
                        [np.sqrt(alpha2 / len(members)) * (d - f0), u_glob]
                    ),
                }
                for key, r in rows.items():
                    sig[key][i] = sand.errors(s, est[i, n_lab], err[i], r)
            truth_p = np.column_stack([labels, rv])
            for key, sg in sig.items():
                z = np.abs(est - truth_p)[ok] / sg[ok]
                cells = " | ".join(
                    f"{np.mean(z[:, j] < 1.0):.2f}" for j in range(z.shape[1])
                )
                print(f"| {pop} | {snr:g} | {key} | {cells} | {ok.sum()} |", flush=True)


if __name__ == "__main__":
    main()
