"""The emulator's HDF5 file: :func:`write_emulator`, :func:`read_emulator_fields`.

Emulator file layout (``format = "payne_lite.Emulator"``, ``format_version = 4``
when the file has ``local_error/``, else 3 when it has ``error_scale``, else 2, so
that older readers read what they can; version 1 files, without ``report/``, are
read too):

========================  =====================  =========================================
item                      shape / type           meaning
========================  =====================  =========================================
``wavelength``            (P,) float64           vacuum wavelength [Angstrom]
``label_lo, label_hi``    (L,) float64           training box, physical units
``net/W0 .. net/W{k}``    see PixelNet/DenseNet  weights
``net/b0 .. net/b{k}``    see PixelNet/DenseNet  biases
``pixel_error``           (P,) float32           optional: validation RMS error per pixel
``error_basis``           (K, P) float32         optional: the validation errors' leading
                                                 principal components, scaled so that
                                                 ``B^T B`` approximates their covariance
``error_scale``           (L + 1, F) float64     optional (v3): the label-space scale of
                                                 the emulator's error over the box,
                                                 coefficients of ``log kappa^2`` on
                                                 :func:`~payne_lite.emulator.error_scale_features`
``local_error/``          group                  optional (v4): the error covariance
                                                 :class:`~payne_lite.emulator.LocalError`
                                                 near any labels:
                                                 ``errors`` (N, P) float32 held-out
                                                 errors, ``scaled`` (N, L) their scaled
                                                 labels, attr ``neighbours``,
                                                 ``shrink``; ``shifts`` (N,) their
                                                 Doppler shifts [km/s]
``history/<name>``        (n_iter,)              optional: loss curves from training
``report/``               group                  optional (v2): the validation report,
                                                 :class:`~payne_lite.emulator.ValidationReport`:
                                                 datasets
                                                 ``labels`` (N, L), ``spectrum_error``
                                                 (N,), ``pixel_median``, ``pixel_p99``
                                                 (P,), ``label_lo``, ``label_hi`` (L,),
                                                 ``coverage`` (L, B), ``coverage_2d``
                                                 (L, L, B, B); JSON attrs
                                                 ``label_names``, ``label_units``,
                                                 ``provenance``
attr ``kind``             "pixel" or "dense"     network family
attr ``activation``       str                    see :data:`~payne_lite.emulator.ACTIVATIONS`
attr ``label_names``      JSON list of str
attr ``label_units``      JSON list of str
attr ``meta``             JSON object            provenance (training config, source)
========================  =====================  =========================================
"""

from __future__ import annotations

import os

import numpy as np

from .. import _h5
from ..errors import FileFormatError
from ._local_error import LocalError
from ._nets import DenseNet, PixelNet
from ._report import ValidationReport

EMULATOR_FORMAT = "payne_lite.Emulator"
EMULATOR_VERSION = 4
#: Versions :meth:`Emulator.load` reads (1: before the validation report; 2: before
#: ``error_scale``; 3: before ``local_error``). A file is written with the lowest
#: version that holds it (2 without ``error_scale`` or ``local_error``, 3 without
#: ``local_error``), so older readers keep reading what they can.
EMULATOR_VERSIONS = (1, 2, 3, 4)


def _net_arrays(net) -> dict[str, np.ndarray]:
    out = {}
    for i, w in enumerate(net.weights):
        out[f"W{i}"] = np.asarray(w)
    for i, b in enumerate(net.biases):
        out[f"b{i}"] = np.asarray(b)
    return out


def write_emulator(emu, path: str | os.PathLike) -> None:
    """Write the :class:`payne_lite.Emulator` ``emu`` to ``path`` (atomically), with
    the lowest format version that holds it."""
    version = (
        EMULATOR_VERSION
        if emu.local_error is not None
        else 3
        if emu.error_scale is not None
        else 2
    )
    with _h5.atomic_h5_writer(path, EMULATOR_FORMAT, version) as f:
        f.attrs["kind"] = emu.kind
        f.attrs["activation"] = emu.activation
        _h5.set_json_attr(f, "label_names", list(emu.label_names))
        _h5.set_json_attr(f, "label_units", list(emu.label_units))
        _h5.set_json_attr(f, "meta", emu.meta)
        _h5.write_dataset(f, "wavelength", emu.wavelength, compress=False)
        _h5.write_dataset(f, "label_lo", emu.label_lo)
        _h5.write_dataset(f, "label_hi", emu.label_hi)
        g = f.create_group("net")
        for name, arr in _net_arrays(emu.net).items():
            _h5.write_dataset(g, name, arr)
        if emu.pixel_error is not None:
            _h5.write_dataset(f, "pixel_error", emu.pixel_error)
        if emu.error_basis is not None:
            _h5.write_dataset(f, "error_basis", emu.error_basis)
        if emu.error_scale is not None:
            _h5.write_dataset(f, "error_scale", emu.error_scale)
        h = f.create_group("history")
        for name, arr in emu.history.items():
            _h5.write_dataset(h, name, np.asarray(arr))
        if emu.report is not None:
            emu.report.write(f.create_group("report"))
        if emu.local_error is not None:
            emu.local_error.write(f.create_group("local_error"))


def read_emulator_fields(path: str | os.PathLike) -> dict:
    """The :class:`payne_lite.Emulator` fields stored in ``path`` (the caller builds
    and so validates the emulator); FileFormatError for a file that is not one."""
    with _h5.open_checked(path, EMULATOR_FORMAT, EMULATOR_VERSIONS) as f:
        kind = str(f.attrs.get("kind", ""))
        if "net" not in f:
            raise FileFormatError(f"{path}: missing group 'net'")
        g = f["net"]
        n_layers = sum(1 for k in g if k.startswith("W"))
        weights = tuple(_h5.read_dataset(g, f"W{i}", path) for i in range(n_layers))
        biases = tuple(_h5.read_dataset(g, f"b{i}", path) for i in range(n_layers))
        net = (DenseNet if kind == "dense" else PixelNet)(weights, biases)
        if kind not in ("pixel", "dense"):
            raise FileFormatError(f"{path}: unknown network kind {kind!r}")
        hist = {
            k: _h5.read_dataset(f["history"], k, path) for k in f.get("history", {})
        }
        kw = dict(
            net=net,
            activation=str(f.attrs.get("activation", "")),
            label_names=_h5.get_json_attr(f, "label_names", path),
            label_units=_h5.get_json_attr(f, "label_units", path),
            label_lo=_h5.read_dataset(f, "label_lo", path),
            label_hi=_h5.read_dataset(f, "label_hi", path),
            wavelength=_h5.read_dataset(f, "wavelength", path),
            pixel_error=(
                _h5.read_dataset(f, "pixel_error", path) if "pixel_error" in f else None
            ),
            history=hist,
            meta=_h5.get_json_attr(f, "meta", path),
            error_basis=(
                _h5.read_dataset(f, "error_basis", path) if "error_basis" in f else None
            ),
            report=(
                ValidationReport.read(f["report"], path) if "report" in f else None
            ),
            error_scale=(
                _h5.read_dataset(f, "error_scale", path) if "error_scale" in f else None
            ),
            local_error=(
                LocalError.read(f["local_error"], path) if "local_error" in f else None
            ),
        )
    return kw
