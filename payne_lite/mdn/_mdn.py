"""Mixture density network (MDN): observed spectrum -> a Gaussian per label and RV.

``mdn = train_mdn(emulator, seed=0)``; ``mean, sigma = mdn.predict(flux, flux_err)``,
both (n, L + 1) in physical units: the emulator's labels, then rv [km/s]. The fitter
uses them as starting point and bounds (``payne_lite.fit(..., mdn=mdn)``), as LUCI
does (Rhea et al. 2021, 2022; Bishop 1994 for MDNs).

The feature extraction and the mixture head (architecture) are in
:mod:`payne_lite.mdn._mixture`; training on simulated spectra in
:mod:`payne_lite.mdn._train`.

References:
    Bishop 1994, "Mixture density networks", Aston University NCRG/94/004.
    Rhea et al. 2021, RNAAS 5, 276; Rhea et al. 2022 (LUCI).
    Ting, Conroy, Rix & Cargile 2019, ApJ 879, 69 ("The Payne").
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from .. import _h5
from .._validate import as_float_array
from ..errors import FileFormatError
from ..observe import check_rv_range
from ._flow import Flow, FlowNet
from ._mixture import (
    COARSE_BIN,
    FINE_RTOL,
    MLP,
    NORM_BIN,
    RV_FINE_HALF,
    RV_OUT_SCALE,
    Features,
    bin_rows,
    context_scaled,
    grid_model,
    low_rank,
    predict_scaled,
    rv_grids,
    template_rows,
    to_span,
)

MDN_FORMAT = "payne_lite.MDN"
#: 2: binned coarse CCF, low-rank fine CCF, rest frame on the embedded span (the
#: features of version-1 files differ: they are refused, retrain). 3: holds a
#: conditional flow (group ``flow``). An MDN without a flow is written as version 2,
#: which older payne_lite reads; a version-3 file they refuse (not a silent loss of
#: the flow).
MDN_VERSION = 3
MDN_VERSIONS_READ = (2, 3)
#: Rows with fewer usable pixels than this fraction get NaN from predict.
MIN_GOOD_FRACTION = 0.05


@dataclasses.dataclass(frozen=True, eq=False)
class MDN:
    """A trained mixture density network for one emulator's labels and pixel grid.

    Attributes:
        net: :class:`MLP` weights (NumPy float32).
        mean_flux: (P,) mean noise-free training spectrum (rest frame).
        basis: (P, K) orthonormal compression basis (PCA components and trends).
        feat_mu, feat_sd: (D,) standardisation of the MLP inputs.
        label_names, label_units: the emulator's (L labels).
        label_lo, label_hi: (L,) the emulator's training box [physical].
        wavelength: (P,) the emulator's (and the spectra's) wavelength grid [A].
        rv_range: (lo, hi) [km/s] of the training RVs.
        n_components: Gaussians per output dimension.
        history: loss curves, name -> (n_epoch,) array.
        meta: provenance (training settings, emulator source).
        flow: an optional :class:`payne_lite.mdn.Flow` over the same outputs (the
            joint posterior; :func:`payne_lite.mdn.train_flow`), or None.
    """

    net: MLP
    mean_flux: np.ndarray
    basis: np.ndarray
    feat_mu: np.ndarray
    feat_sd: np.ndarray
    label_names: tuple[str, ...]
    label_units: tuple[str, ...]
    label_lo: np.ndarray
    label_hi: np.ndarray
    wavelength: np.ndarray
    rv_range: tuple[float, float]
    n_components: int = 1
    history: dict = dataclasses.field(default_factory=dict)
    meta: dict = dataclasses.field(default_factory=dict)
    flow: Flow | None = None
    _cache: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        wave = as_float_array(self.wavelength, "wavelength", ndim=1)
        n_pix = wave.size
        n_lab = len(self.label_names)
        mean = as_float_array(self.mean_flux, "mean_flux", ndim=1)
        basis = as_float_array(self.basis, "basis", ndim=2)
        if mean.shape != (n_pix,) or basis.shape[0] != n_pix:
            raise ValueError(
                f"mean_flux {mean.shape} and basis {basis.shape} must have "
                f"{n_pix} pixels (the wavelength grid's)"
            )
        lo = as_float_array(self.label_lo, "label_lo", ndim=1)
        hi = as_float_array(self.label_hi, "label_hi", ndim=1)
        if lo.shape != (n_lab,) or hi.shape != (n_lab,) or not np.all(lo < hi):
            raise ValueError(
                f"label_lo {lo.shape}, label_hi {hi.shape} must be ({n_lab},) with "
                "lo < hi"
            )
        if len(self.label_units) != n_lab:
            raise ValueError(f"{len(self.label_units)} label_units for {n_lab} labels")
        n_out = 3 * int(self.n_components) * (n_lab + 1)
        net = MLP(
            tuple(np.asarray(w, np.float32) for w in self.net.weights),
            tuple(np.asarray(b, np.float32) for b in self.net.biases),
        )
        if net.weights[-1].shape[-1] != n_out:
            raise ValueError(
                f"network output {net.weights[-1].shape[-1]} does not match "
                f"{self.n_components} component(s) x 3 x {n_lab + 1} outputs"
            )
        rv_range = check_rv_range(self.rv_range)
        if self.flow is not None:
            if not isinstance(self.flow, Flow):
                raise ValueError(f"flow must be a Flow or None, got {self.flow!r}")
            n_feat = net.weights[0].shape[0]
            if self.flow.n_dim != n_lab + 1 or (
                self.flow.net.embed.weights[0].shape[0] != n_feat
            ):
                raise ValueError(
                    f"flow over {self.flow.n_dim} outputs from "
                    f"{self.flow.net.embed.weights[0].shape[0]} features does not "
                    f"match the MDN's {n_lab + 1} outputs from {n_feat} features"
                )
        for name, val in [
            ("net", net),
            ("mean_flux", mean),
            ("basis", basis),
            ("feat_mu", np.asarray(self.feat_mu, np.float32)),
            ("feat_sd", np.asarray(self.feat_sd, np.float32)),
            ("label_names", tuple(str(s) for s in self.label_names)),
            ("label_units", tuple(str(s) for s in self.label_units)),
            ("label_lo", lo),
            ("label_hi", hi),
            ("wavelength", wave),
            ("rv_range", rv_range),
            ("n_components", int(self.n_components)),
            ("history", {k: np.asarray(v) for k, v in self.history.items()}),
            ("meta", dict(self.meta)),
        ]:
            object.__setattr__(self, name, val)

    @property
    def n_labels(self) -> int:
        return len(self.label_names)

    @property
    def n_pix(self) -> int:
        return self.wavelength.size

    @property
    def output_names(self) -> tuple[str, ...]:
        return (*self.label_names, "rv")

    def __repr__(self) -> str:
        flow = f", {self.flow!r}" if self.flow is not None else ""
        return (
            f"MDN({self.n_components} component(s), {self.n_pix} pixels, "
            f"outputs {list(self.output_names)}, rv {self.rv_range} km/s{flow})"
        )

    # -- checks ---------------------------------------------------------------------
    def check_emulator(self, emulator) -> None:
        """Refuse an emulator this MDN was not trained for (names, box, grid).

        Raises:
            ValueError: naming what differs.
        """
        if tuple(emulator.label_names) != self.label_names:
            raise ValueError(
                f"MDN trained for labels {list(self.label_names)}, the emulator has "
                f"{list(emulator.label_names)}"
            )
        for what, a, b in [
            ("label_lo", self.label_lo, emulator.label_lo),
            ("label_hi", self.label_hi, emulator.label_hi),
        ]:
            if not np.allclose(a, b, rtol=1e-6, atol=0.0):
                raise ValueError(
                    f"MDN trained for a training box {what}={a.tolist()}, the "
                    f"emulator's is {np.asarray(b).tolist()}"
                )
        self.check_wavelength(emulator.wavelength, what="the emulator's")

    def check_wavelength(self, wavelength, *, what: str = "the spectra's") -> None:
        """Refuse a wavelength grid other than the MDN's.

        Raises:
            ValueError: naming both grids.
        """
        w = np.asarray(wavelength, np.float64)
        if w.shape != self.wavelength.shape or not np.allclose(
            w, self.wavelength, rtol=1e-9, atol=0.0
        ):
            raise ValueError(
                f"MDN trained on a wavelength grid of {self.n_pix} pixels "
                f"[{self.wavelength[0]:g}, {self.wavelength[-1]:g}] A; {what} grid has "
                f"{w.size} pixels [{w.min() if w.size else np.nan:g}, "
                f"{w.max() if w.size else np.nan:g}] A: resample the spectra onto "
                "the MDN's grid or train an MDN for this grid"
                + (
                    f" (max |difference| {np.max(np.abs(w - self.wavelength)):.3g} A)"
                    if w.shape == self.wavelength.shape
                    else ""
                )
            )

    # -- jitted pieces --------------------------------------------------------------
    def _device(self, dtype=None):
        dt = jax.dtypes.canonicalize_dtype(dtype or jnp.result_type(float))
        key = np.dtype(dt).str
        if key not in self._cache:
            coarse, fine = rv_grids(self.rv_range)
            rv_max = max(abs(coarse[0]), abs(coarse[-1])) + RV_FINE_HALF + 5.0
            grid = grid_model(self.wavelength, rv_max, dt)
            t0 = jnp.asarray(1.0 - self.mean_flux, dt)
            tc = np.asarray(template_rows(grid, t0, jnp.asarray(coarse, dt)), float)
            tf = np.asarray(template_rows(grid, t0, jnp.asarray(fine, dt)), float)
            lg = grid.log_grid
            span = (lambda x: x) if lg is None else functools.partial(to_span, lg)
            v, a = low_rank(span(tf), FINE_RTOL)
            v2, a2 = low_rank(span(tf * tf), FINE_RTOL)
            fx = Features(
                *(
                    jnp.asarray(x, dt)
                    for x in (
                        span(self.mean_flux),
                        bin_rows(tc, COARSE_BIN),
                        bin_rows(tc * tc, NORM_BIN),
                        v,
                        a,
                        v2,
                        a2,
                        span(self.basis.T).T,
                        self.feat_mu,
                        self.feat_sd,
                    )
                )
            )
            net = jax.tree.map(lambda a: jnp.asarray(a, dt), self.net)
            self._cache[key] = (
                net,
                grid,
                fx,
                jnp.asarray(coarse, dt),
                jnp.asarray(fine, dt),
            )
        return self._cache[key]

    def predict(
        self,
        flux,
        flux_err,
        mask=None,
        *,
        wavelength=None,
        batch_size: int = 64,
        dtype=None,
        n_threads: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Gaussian per label and rv for observed spectra.

        Args:
            flux: (n, P) or (P,) observed flux on the MDN's wavelength grid.
            flux_err: same shape, 1-sigma errors; non-finite or non-positive errors
                and non-finite flux mark the pixel as unusable.
            mask: optional bool (P,) or (n, P), True = ignore the pixel.
            wavelength: optional (P,) grid of the spectra, checked against the
                MDN's (None = the MDN's).
            batch_size: spectra per jitted call (the last call padded, so that one
                compilation serves any number of spectra). 64
                keeps a batch's (n, P) intermediates in the L2 cache: 2-3x faster
                per spectrum than 512 on APOGEE's 7214 pixels.
            dtype: computation dtype (default JAX's default float).
            n_threads: batches run at once in threads (default: the CPU cores on
                the CPU backend). Results do not depend on it.

        Returns:
            ``(mean, sigma)``, each (n, L + 1) (or (L + 1,) for one spectrum):
            labels [label units] then rv [km/s]. Rows with fewer than
            ``MIN_GOOD_FRACTION`` usable pixels are NaN.

        Raises:
            ValueError: shapes that do not fit the MDN's grid, another wavelength.
        """
        n_out = self.n_labels + 1
        mean = np.empty((len(np.atleast_2d(flux)), n_out))
        sigma = np.empty_like(mean)

        def body(sl, fb, eb, mb, dev):
            net, grid, fx, rc, rf = dev
            mu_s, sd_s, rv, frac = predict_scaled(
                net, grid, fx, rc, rf, fb, eb, mb, n_dim=n_out,
                n_comp=self.n_components,
            )  # fmt: skip
            m = sl.stop - sl.start
            mean[sl], sigma[sl] = self._unscale(
                np.asarray(mu_s, np.float64)[:m],
                np.asarray(sd_s, np.float64)[:m],
                np.asarray(rv, np.float64)[:m],
            )
            low = np.asarray(frac)[:m] < MIN_GOOD_FRACTION
            mean[sl][low] = np.nan
            sigma[sl][low] = np.nan

        self._map_rows(
            body, flux, flux_err, mask, wavelength, batch_size, dtype, n_threads
        )
        if np.ndim(flux) == 1:
            return mean[0], sigma[0]
        return mean, sigma

    def _map_rows(
        self, body, flux, flux_err, mask, wavelength, batch_size, dtype, n_threads
    ):
        """Checks the spectra, then calls ``body(rows, flux, err, mask, device)`` on
        batches of ``batch_size`` rows (device arrays, the last batch padded, so one
        compilation serves any number of spectra; ``rows`` the batch's slice of
        the spectra, ``device`` :meth:`_device`'s arrays), ``n_threads`` batches at
        once (default: the CPU cores on the CPU backend)."""
        if wavelength is not None:
            self.check_wavelength(wavelength)
        f, e, m_all = _check_shapes(flux, flux_err, mask, self.n_pix)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        dev = self._device(dtype)
        dt = dev[2].mean.dtype
        n, P = f.shape
        size = int(batch_size)

        def one(start):
            sl = slice(start, min(start + size, n))
            m = sl.stop - sl.start
            mk = m_all[sl] if m_all.shape[0] == n else np.broadcast_to(m_all, (m, P))
            body(
                sl,
                _rows(f[sl], size, dt, 0.0),
                _rows(e[sl], size, dt, 1.0),
                _rows(mk, size, bool, True),
                dev,
            )

        starts = range(0, n, size)
        if n_threads is None:
            from .._serial import default_threads

            n_threads = default_threads()
        if n_threads > 1 and len(starts) > 1:
            # JAX releases the GIL while a batch runs: the per-row shifts (lax.map)
            # run on one core, so one batch per core (measured 1.7x on 2 cores)
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(int(n_threads), len(starts))) as pool:
                list(pool.map(one, starts))
        else:
            for start in starts:
                one(start)

    def flow_context(
        self, flux, flux_err, mask=None, *, wavelength=None, batch_size: int = 64
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What the flow is conditioned on, per spectrum: the standardised features
        (n, D) float32, ``rv_ccf`` (n,) [km/s] (the flow's rv is relative to it)
        and whether the row is usable (n,) bool (at least ``MIN_GOOD_FRACTION`` of
        its pixels). Arguments as :meth:`predict`'s."""
        n = len(np.atleast_2d(flux))
        feat = np.empty((n, self.net.weights[0].shape[0]), np.float32)
        rv_ccf = np.empty(n)
        ok = np.empty(n, bool)

        def body(sl, fb, eb, mb, dev):
            _, grid, fx, rc, rf = dev
            x, rv, frac = context_scaled(grid, fx, rc, rf, fb, eb, mb)
            m = sl.stop - sl.start
            feat[sl] = np.asarray(x)[:m]
            rv_ccf[sl] = np.asarray(rv, np.float64)[:m]
            ok[sl] = np.asarray(frac)[:m] >= MIN_GOOD_FRACTION

        self._map_rows(body, flux, flux_err, mask, wavelength, batch_size, None, 1)
        return feat, rv_ccf, ok

    def flow_sample(
        self, flux, flux_err, mask=None, *, n_draws: int = 1000, seed: int = 0,
        wavelength=None,
    ) -> np.ndarray:  # fmt: skip
        """Draws of the flow's joint posterior per spectrum, a fast approximate
        posterior on its own (no likelihood evaluated; ``payne_lite.sample(...,
        method="flow-is")`` weights such draws by the likelihood).

        Args:
            flux, flux_err, mask, wavelength: as :meth:`predict`'s.
            n_draws: draws per spectrum.
            seed: the base draws' seed.

        Returns:
            (n, n_draws, L + 1) labels [label units] then rv [km/s] ((n_draws, L + 1)
            for one spectrum); NaN for rows with too few usable pixels.

        Raises:
            ValueError: no flow (train one with :func:`payne_lite.mdn.train_flow`),
                bad shapes.
        """
        flow = self._need_flow()
        feat, rv_ccf, ok = self.flow_context(
            flux, flux_err, mask, wavelength=wavelength
        )
        rng = np.random.default_rng(seed)
        L = self.n_labels
        m = int(n_draws)
        out = np.full((len(feat), m, L + 1), np.nan)
        for i in np.flatnonzero(ok):
            y = flow.from_base(feat[i], rng.standard_normal((m, L + 1)))
            # the MDN's target space -> physical units, as predict's means
            out[i] = self._unscale(y, np.zeros_like(y), np.full(m, rv_ccf[i]))[0]
        return out[0] if np.ndim(flux) == 1 else out

    def _need_flow(self) -> Flow:
        if self.flow is None:
            raise ValueError(
                "this MDN has no flow: train one with "
                "payne_lite.mdn.train_flow(emulator, mdn) (or use the MDN's "
                "Gaussians: method='mdn-is')"
            )
        return self.flow

    def _unscale(self, mu, sd, rv_ccf):
        span = self.label_hi - self.label_lo
        L = self.n_labels
        mean = np.empty_like(mu)
        sigma = np.empty_like(sd)
        mean[:, :L] = (mu[:, :L] + 0.5) * span + self.label_lo
        sigma[:, :L] = sd[:, :L] * span
        mean[:, L] = rv_ccf + RV_OUT_SCALE * mu[:, L]
        sigma[:, L] = RV_OUT_SCALE * sd[:, L]
        return mean, sigma

    # -- files ----------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the MDN to one versioned HDF5 file (atomically)."""
        version = MDN_VERSION if self.flow is not None else 2
        with _h5.atomic_h5_writer(path, MDN_FORMAT, version) as f:
            _h5.set_json_attr(f, "label_names", list(self.label_names))
            _h5.set_json_attr(f, "label_units", list(self.label_units))
            _h5.set_json_attr(f, "rv_range", list(self.rv_range))
            _h5.set_json_attr(f, "meta", self.meta)
            f.attrs["n_components"] = self.n_components
            f.attrs["n_layers"] = len(self.net.weights)
            _h5.write_dataset(f, "wavelength", self.wavelength, compress=False)
            for name in ("label_lo", "label_hi", "mean_flux"):
                _h5.write_dataset(f, name, getattr(self, name))
            # used in float32: stored so (half the file)
            _h5.write_dataset(f, "basis", self.basis.astype(np.float32))
            _h5.write_dataset(f, "feat_mu", self.feat_mu)
            _h5.write_dataset(f, "feat_sd", self.feat_sd)
            g = f.create_group("net")
            for i, (w, b) in enumerate(
                zip(self.net.weights, self.net.biases, strict=True)
            ):
                _h5.write_dataset(g, f"W{i}", w)
                _h5.write_dataset(g, f"b{i}", b)
            h = f.create_group("history")
            for name, arr in self.history.items():
                _h5.write_dataset(h, name, np.asarray(arr))
            if self.flow is not None:
                _save_flow(f.create_group("flow"), self.flow)

    @classmethod
    def load(cls, path: str | os.PathLike, *, emulator=None) -> MDN:
        """Read an MDN written by :meth:`save`; with ``emulator``, refuse a mismatch.

        Raises:
            FileNotFoundError: no such file.
            payne_lite.FileFormatError: not an MDN file, another version, corrupt or
                inconsistent contents.
            ValueError: ``emulator`` given and not the one the MDN was trained for.
        """
        with _h5.open_checked(path, MDN_FORMAT, MDN_VERSIONS_READ) as f:
            if "net" not in f:
                raise FileFormatError(f"{path}: missing group 'net'")
            n_layers = int(f.attrs.get("n_layers", 0))
            g = f["net"]
            net = MLP(
                tuple(_h5.read_dataset(g, f"W{i}", path) for i in range(n_layers)),
                tuple(_h5.read_dataset(g, f"b{i}", path) for i in range(n_layers)),
            )
            kw = dict(
                net=net,
                label_names=_h5.get_json_attr(f, "label_names", path),
                label_units=_h5.get_json_attr(f, "label_units", path),
                rv_range=_h5.get_json_attr(f, "rv_range", path),
                meta=_h5.get_json_attr(f, "meta", path),
                n_components=int(f.attrs.get("n_components", 1)),
                history={
                    k: _h5.read_dataset(f["history"], k, path)
                    for k in f.get("history", {})
                },
                flow=_load_flow(f["flow"], path) if "flow" in f else None,
                **{
                    k: _h5.read_dataset(f, k, path)
                    for k in (
                        "wavelength",
                        "label_lo",
                        "label_hi",
                        "mean_flux",
                        "basis",
                        "feat_mu",
                        "feat_sd",
                    )
                },
            )
        try:
            mdn = cls(**kw)
        except (ValueError, TypeError, IndexError) as err:
            raise FileFormatError(f"{path}: inconsistent MDN file: {err}") from err
        if emulator is not None:
            mdn.check_emulator(emulator)
        return mdn


def _save_flow(g, flow: Flow) -> None:
    _h5.set_json_attr(g, "meta", flow.meta)
    g.attrs["n_layers"] = flow.n_layers
    g.attrs["n_embed"] = len(flow.net.embed.weights)
    g.attrs["n_made"] = len(flow.net.made[0].weights)
    _h5.write_dataset(g, "y_mu", flow.y_mu)
    _h5.write_dataset(g, "y_sd", flow.y_sd)
    for prefix, mlp in (("embed", flow.net.embed),) + tuple(
        (f"made{i}", m) for i, m in enumerate(flow.net.made)
    ):
        for j, (w, b) in enumerate(zip(mlp.weights, mlp.biases, strict=True)):
            _h5.write_dataset(g, f"{prefix}_W{j}", w)
            _h5.write_dataset(g, f"{prefix}_b{j}", b)
    h = g.create_group("history")
    for name, arr in flow.history.items():
        _h5.write_dataset(h, name, np.asarray(arr))


def _load_flow(g, path) -> Flow:
    def mlp(prefix, n):
        return MLP(
            tuple(_h5.read_dataset(g, f"{prefix}_W{j}", path) for j in range(n)),
            tuple(_h5.read_dataset(g, f"{prefix}_b{j}", path) for j in range(n)),
        )

    missing = [k for k in ("n_layers", "n_embed", "n_made") if k not in g.attrs]
    if missing:
        raise FileFormatError(f"{path}: flow group without attribute(s) {missing}")
    n_layers, n_embed, n_made = (
        int(g.attrs[k]) for k in ("n_layers", "n_embed", "n_made")
    )
    net = FlowNet(
        mlp("embed", n_embed), tuple(mlp(f"made{i}", n_made) for i in range(n_layers))
    )
    try:
        return Flow(
            net=net,
            y_mu=_h5.read_dataset(g, "y_mu", path),
            y_sd=_h5.read_dataset(g, "y_sd", path),
            history={
                k: _h5.read_dataset(g["history"], k, path) for k in g.get("history", {})
            },
            meta=_h5.get_json_attr(g, "meta", path),
        )
    except (ValueError, TypeError, IndexError) as err:
        raise FileFormatError(
            f"{path}: inconsistent flow in the MDN file: {err}"
        ) from err


def _rows(a, size: int, dtype, fill):
    """``a`` (m, P) as a (size, P) device array of ``dtype``, padded with ``fill``
    (one host conversion, no copy for a full batch already in ``dtype``)."""
    x = np.asarray(a, dtype)
    if x.shape[0] < size:
        pad = np.full((size - x.shape[0], x.shape[1]), fill, dtype)
        x = np.concatenate([x, pad])
    return jnp.asarray(x)


def _check_shapes(flux, flux_err, mask, n_pix):
    """(flux, err) as (n, P) arrays (no copy when possible) and the mask as (1, P) or
    (n, P) bool; the pixel checks happen inside the jitted features."""
    f = np.atleast_2d(np.asarray(flux))
    e = np.atleast_2d(np.asarray(flux_err))
    for name, a in (("flux", f), ("flux_err", e)):
        if a.ndim != 2 or not np.issubdtype(a.dtype, np.number):
            raise ValueError(f"{name} must be a numeric (n_spec, {n_pix}) array")
    if f.shape != e.shape or f.shape[-1] != n_pix:
        raise ValueError(
            f"flux {np.shape(flux)} and flux_err {np.shape(flux_err)} must both be "
            f"(n_spec, {n_pix}) or ({n_pix},) (the MDN's wavelength grid)"
        )
    if mask is None:
        return f, e, np.zeros((1, n_pix), bool)
    m = np.asarray(mask)
    if m.dtype != bool or m.shape not in ((n_pix,), np.shape(flux), f.shape):
        raise ValueError(
            f"mask must be bool ({n_pix},) or the shape of flux {np.shape(flux)}, got "
            f"{m.dtype} {m.shape}"
        )
    return f, e, np.atleast_2d(m)
