"""``payne-lite demo``: the main job on the embedded default, nothing downloaded.

Today it loads (or, if missing, builds) the default emulator of the built-in
synthesizer, draws a catalog of spectra with known labels that the emulator never saw,
checks the emulator against the synthesizer on them, and writes a table and figures.
Fitting the catalog joins this job with the fitter (issue 3).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from .emulator import Emulator

log = logging.getLogger(__name__)

#: Where the checkout keeps the default emulator (``data/make_default_emulator.py``).
DEFAULT_EMULATOR = Path(__file__).resolve().parents[1] / "data" / "default_emulator.h5"


def load_default_emulator(
    path: Path | None = None, *, progress: bool = True
) -> Emulator:
    """The default emulator: from ``path`` (default :data:`DEFAULT_EMULATOR`), else built.

    Building it from scratch (no file) makes the default grid and trains on it, as
    ``data/make_default_emulator.py`` does, and saves it to ``path``: a few minutes.
    """
    from . import synth
    from .train import train_emulator

    path = Path(path) if path is not None else DEFAULT_EMULATOR
    if path.exists():
        return Emulator.load(path)
    log.warning(
        "%s not found: building the default grid and emulator (a few minutes)", path
    )
    grid = synth.make_grid(2000, seed=0, progress=progress)
    emu = train_emulator(grid, hidden=10, seed=0, max_iter=150, progress=progress)
    emu.save(path)
    return emu


def run_demo(
    outdir: str | Path = "payne_lite_demo",
    *,
    n_spec: int = 300,
    seed: int = 1,
    emulator: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Run the demo; returns the summary numbers it prints.

    Writes into ``outdir``: ``catalog_truth.ecsv`` (labels of the simulated catalog and
    the emulator's error on each spectrum) and ``figures/`` (PNG and PDF).
    """
    from astropy.table import Table

    from . import plots, synth

    outdir = Path(outdir)
    (outdir / "figures").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    emu = load_default_emulator(
        None if emulator is None else Path(emulator), progress=progress
    )
    t_load = time.perf_counter() - t0

    labels = synth.sample_labels(n_spec, seed=seed, method="uniform")
    t = time.perf_counter()
    truth_flux = synth.synthesize(labels, wavelength=emu.wavelength)
    t_synth = time.perf_counter() - t
    emu.predict(labels)  # compile for this batch shape outside the timing
    t = time.perf_counter()
    model_flux = emu.predict(labels)
    t_emu = time.perf_counter() - t
    resid = model_flux - truth_flux

    table = Table({name: labels[:, j] for j, name in enumerate(emu.label_names)})
    for name, unit in zip(emu.label_names, emu.label_units, strict=True):
        table[name].unit = unit or None
        table[name].description = f"true {name}"
    table["emu_median_abs_err"] = np.median(np.abs(resid), axis=1)
    table["emu_rms_err"] = np.sqrt(np.mean(resid**2, axis=1))
    table.meta["emulator"] = repr(emu)
    table.write(outdir / "catalog_truth.ecsv", overwrite=True)

    figs = outdir / "figures"
    names = dict(data_label="synthesizer", model_label="emulator")
    plots.emulator_error_histogram(resid, figs / "emulator_error_hist")
    worst = int(np.argmax(table["emu_rms_err"]))
    plots.spectrum_with_model(
        emu.wavelength,
        truth_flux[worst],
        model_flux[worst],
        figs / "spectrum_model_worst",
        title=_label_text(emu, labels[worst]) + "  (worst of catalog)",
        **names,
    )
    plots.spectrum_with_model(
        emu.wavelength,
        truth_flux[0],
        model_flux[0],
        figs / "spectrum_model_example",
        title=_label_text(emu, labels[0]),
        **names,
    )
    if emu.history:
        plots.loss_curves(emu.history, figs / "training_loss")

    pixel_mae = np.median(np.abs(resid), axis=0)
    summary = dict(
        n_spec=n_spec,
        n_pix=emu.n_pix,
        median_abs_error=float(np.median(pixel_mae)),
        p99_pixel_error=float(np.percentile(pixel_mae, 99)),
        emulator_spectra_per_s=n_spec / t_emu,
        synth_spectra_per_s=n_spec / t_synth,
        load_seconds=t_load,
        total_seconds=time.perf_counter() - t0,
        outdir=str(outdir),
    )
    return summary


def _label_text(emu: Emulator, x) -> str:
    return ", ".join(
        f"{n}={v:.4g}{(' ' + u) if u else ''}"
        for n, u, v in zip(emu.label_names, emu.label_units, x, strict=True)
    )
