"""Every combination of method, grid, visits, instrument and entry point works or is
refused at the boundary.

The matrix: {lm, curve_fit, emcee, nuts, mdn-is} x {one grid, per-star grids} x
{single spectra, group=} x {no instrument, resolution 8000 + vsini} x {pl.fit,
pl.fit_catalog, payne-lite fit}: 120 cells. A cell that works returns the documented
schema (one row per spectrum, or per star with ``group=``; the labels, their errors,
rv, flags; the instrument in ``meta["instrument"]``). A refused cell raises a clear
error naming the reason, and no XLA compilation happened before it (no work
started). ``REFUSED`` lists the refused cells and their reasons: the combinations
still to build shrink it. The case is small: a random 3-label emulator on a
log-uniform grid of 120 pixels (the broadening kernels need one), 4 spectra (2 stars
x 2 visits), short sampler runs.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import warnings

import jax
import numpy as np
import pytest
from conftest import build_log_emulator

import payne_lite as pl
from payne_lite.cli import main

METHODS = ("lm", "curve_fit", "emcee", "nuts", "mdn-is")
GRIDS = ("one_grid", "per_star_grids")
VISITS = ("single", "group")
INSTRUMENTS = ("no_instrument", "resolution_vsini")
ENTRIES = ("fit", "fit_catalog", "cli")

SAMPLERS = ("emcee", "nuts", "mdn-is")

OPTIONS = {
    "lm": pl.LMOptions(max_iter=30),
    "curve_fit": pl.CurveFitOptions(max_iter=60),
    "emcee": pl.EmceeOptions(n_walkers=16, n_steps=40, check_every=40),
    "nuts": pl.NUTSOptions(n_chains=2, n_warmup=10, n_steps=20, check_every=20),
    "mdn-is": pl.ISOptions(
        n_draws=64, adapt=0, ess_min=0.0, fallback=pl.EmceeOptions(n_steps=40)
    ),
}


def refusal(method, grid, visits, instrument, entry) -> str | None:
    """The reason (a regex of the error) a cell is refused, or None if it works.

    In the order the checks meet a call."""
    sampler = method in SAMPLERS
    plain = instrument == "no_instrument"
    if sampler and visits == "group":
        return r"group is a point-fit argument"
    if sampler and grid == "per_star_grids":
        return r"the samplers take one wavelength grid"
    if method == "mdn-is" and not plain:
        return r"'mdn-is' samples no broadening"
    return None


CELLS = list(itertools.product(METHODS, GRIDS, VISITS, INSTRUMENTS, ENTRIES))


class CompileCounter:
    """XLA compilations seen while active (jax.monitoring)."""

    EVENT = "/jax/core/compile/backend_compile_duration"
    count = 0
    _lock = threading.Lock()
    _registered = False

    @classmethod
    def _on(cls, event, *args, **kwargs):
        if event == cls.EVENT:
            with cls._lock:
                cls.count += 1

    @classmethod
    def register(cls):
        if not cls._registered:
            jax.monitoring.register_event_duration_secs_listener(cls._on)
            cls._registered = True


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Emulator, MDN, spectra and files shared by every cell."""
    tmp = tmp_path_factory.mktemp("matrix")
    n_pix = 120
    emu = build_log_emulator(n_pix)
    wave = emu.wavelength
    truth = np.array(
        [
            [5000.0, 3.0, -0.5],
            [5000.0, 3.0, -0.5],
            [6200.0, 4.2, 0.0],
            [6200.0, 4.2, 0.0],
        ]
    )
    rng = np.random.default_rng(0)
    full = emu.predict(truth)
    err = np.full_like(full, 0.005)
    full = full + rng.normal(0.0, 0.005, full.shape)
    m = n_pix - 6
    rows = [0, 0, 3, 3]  # per-star grids: two distinct slices of the grid
    per_flux = np.stack([full[i, k : k + m] for i, k in enumerate(rows)])
    per_wave = np.stack([wave[k : k + m] for k in rows])
    group = np.array(["a", "a", "b", "b"])
    emu_path = tmp / "emu.h5"
    emu.save(emu_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a deliberately small, poor MDN
        mdn = pl.train_mdn(
            emu, n_train=256, n_valid=64, epochs=1, n_pca=4, hidden=(8,),
            batch_size=64, rv_range=(-50.0, 50.0), seed=0, progress=False,
        )  # fmt: skip
    mdn_path = tmp / "mdn.h5"
    mdn.save(mdn_path)
    cat_path = pl.write_catalog(tmp / "cat.h5", full, err, wave)
    CompileCounter.register()
    return dict(
        emu=emu, emu_path=emu_path, mdn=mdn, mdn_path=mdn_path, cat=cat_path,
        flux=full, err=err, wave=wave, per_flux=per_flux, per_err=err[:, :m],
        per_wave=per_wave, group=group, tmp=tmp,
    )  # fmt: skip


def _instrument(name):
    return (
        pl.Instrument(resolution=8000.0, vsini=True)
        if name != "no_instrument"
        else None
    )


def _run(case, method, grid, visits, instrument, entry, tag):
    inst = _instrument(instrument)
    mdn_kw = {"mdn": case["mdn"]} if method == "mdn-is" else {}
    group_kw = {"group": case["group"]} if visits == "group" else {}
    rv_kw = {"rv_range": (-50.0, 50.0)}
    out = case["tmp"] / f"{tag}.fits"
    if entry == "fit":
        flux, err, wave = (
            (case["flux"], case["err"], None)
            if grid == "one_grid"
            else (case["per_flux"], case["per_err"], case["per_wave"])
        )
        return pl.fit(
            flux, err, case["emu"], wavelength=wave, method=method, instrument=inst,
            options=OPTIONS[method], **mdn_kw, **group_kw, **rv_kw,
        )  # fmt: skip
    cat = case["cat"]
    if grid == "per_star_grids" or visits == "group":
        one = grid != "per_star_grids"
        cat = pl.write_catalog(
            case["tmp"] / f"{tag}.h5", case["flux" if one else "per_flux"],
            case["err" if one else "per_err"], case["wave" if one else "per_wave"],
            group=case["group"] if visits == "group" else None,
        )  # fmt: skip
    if entry == "fit_catalog":
        return pl.fit_catalog(
            cat, out, case["emu"], method=method, instrument=inst,
            options=OPTIONS[method], progress=False, **mdn_kw,
            **({"group": True} if group_kw else {}), **rv_kw,
        )  # fmt: skip
    argv = ["fit", str(cat), "--emulator", str(case["emu_path"]), "-o", str(out)]
    opts = {
        k: v
        for k, v in OPTIONS[method].to_meta().items()
        if k not in ("fallback", "moves", "backend_path") and v is not None
    }
    argv += ["--method", method, "--options", json.dumps(opts), "--no-progress"]
    argv += ["--rv-range", "-50", "50"]  # as the other entries: one compilation
    if inst is not None:
        argv += ["--resolution", "8000", "--vsini"]
    if method == "mdn-is":
        argv += ["--mdn", str(case["mdn_path"])]
    if visits == "group":
        argv += ["--group"]
    code = main(argv)
    if code != 0:
        raise SystemExit(code)
    return pl.read_results(out)


def _check_schema(t, case, method, visits, instrument):
    n_rows = 2 if visits == "group" else 4
    assert len(t) == n_rows
    pl.check_results_schema(t)  # the one schema: columns, units, meta
    kind = "posterior" if method in SAMPLERS else visits.replace("single", "point")
    assert t.meta["kind"] == kind and t.meta["method"] == method
    for name in case["emu"].label_names:
        assert name in t.colnames and f"{name}_err" in t.colnames
    for name in ("rv", "rv_err", "flags", "converged"):
        assert name in t.colnames, name
    if method in SAMPLERS:
        assert "Teff_p16" in t.colnames and "Teff_p84" in t.colnames
    inst = pl.Instrument.from_meta(t.meta["instrument"])
    if instrument == "no_instrument":
        assert not inst.has_profile and not inst.vsini
    else:
        assert inst.resolution == 8000.0 and inst.vsini
        assert "vsini" in t.colnames
    assert np.all(np.isfinite(np.asarray(t["Teff"], float)))


@pytest.mark.parametrize(
    "method, grid, visits, instrument, entry",
    CELLS,
    ids=["-".join(c) for c in CELLS],
)
def test_cell(case, capsys, method, grid, visits, instrument, entry):
    reason = refusal(method, grid, visits, instrument, entry)
    tag = "-".join((method, grid, visits, instrument, entry))
    if reason is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pl.SamplingWarning)  # short chains
            t = _run(case, method, grid, visits, instrument, entry, tag)
        _check_schema(t, case, method, visits, instrument)
        return
    before = CompileCounter.count
    with pytest.raises((ValueError, TypeError, SystemExit)) as info:
        _run(case, method, grid, visits, instrument, entry, tag)
    text = str(info.value)
    if info.type is SystemExit:
        assert info.value.code == 2
        text = capsys.readouterr().err
    assert re.search(reason, text), text
    assert CompileCounter.count == before, "work started before the refusal"


def test_matrix_summary():
    """The count of cells that work and the refused cells, by reason (printed)."""
    refused = {}
    for cell in CELLS:
        reason = refusal(*cell)
        if reason is not None:
            refused.setdefault(reason, []).append("-".join(cell))
    n_work = len(CELLS) - sum(map(len, refused.values()))
    print(f"\n{len(CELLS)} cells: {n_work} work, {len(CELLS) - n_work} refused")
    for reason, cells in refused.items():
        print(f"  {len(cells):3d} refused: {reason}")
    # every lm and curve_fit cell works
    for cell in CELLS:
        if cell[0] in ("lm", "curve_fit"):
            assert refusal(*cell) is None, cell
    # every sampler with one grid on single spectra works through every entry
    for method in ("emcee", "nuts"):
        for inst in INSTRUMENTS:
            for entry in ENTRIES:
                assert refusal(method, "one_grid", "single", inst, entry) is None
    assert refusal("mdn-is", "one_grid", "single", "no_instrument", "fit") is None
    assert n_work >= 63
