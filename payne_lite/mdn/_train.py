"""Training an MDN on spectra simulated from an emulator.

Training (:func:`train_mdn`): spectra simulated from the emulator when training
starts (nothing read from disk): labels uniform in the box, rv uniform in
``rv_range``, the same shift as the fitter's model, a random continuum tilt, noise at
a log-uniform S/N in ``snr_range``, random masked chunks and pixels; Adam (optax) on
the negative log-likelihood, early stopping on the validation NLL, the best
parameters kept, loss curves in ``history``.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._validate import as_float_array
from ..observe import check_rv_range
from ._mdn import MDN
from ._mixture import (
    MLP,
    RV_OUT_SCALE,
    features_batch,
    grid_model,
    mixture_nll,
    mixture_params,
    mlp_forward,
    rv_grids,
    shift_batch,
)

log = logging.getLogger("payne_lite.mdn")  # one logger per stage

#: MLP inputs whose spread over the training set is below this are not used.
FEATURE_SD_MIN = 1e-4
#: The Doppler shift of the simulated spectra (:func:`simulate`): a twelve-tap
#: windowed sinc, the band-limited reconstruction of the rest-frame spectrum, as a
#: star's own shift looks on a well-sampled grid. Linear interpolation (before)
#: blurred the lines by an amount that depends on the rv's pixel phase, so the MDN
#: learnt macroturbulence from blurred spectra and read real ones as too narrow.
SIM_DOPPLER = "lanczos6"


def _check_spectra(flux, flux_err, mask, n_pix):
    """(flux, err, bad) as (n, P) copies; bad = unusable or masked pixels."""
    f = as_float_array(flux, "flux", ndim=(1, 2))
    e = as_float_array(flux_err, "flux_err", ndim=(1, 2))
    if f.shape != e.shape or f.shape[-1] != n_pix:
        raise ValueError(
            f"flux {f.shape} and flux_err {e.shape} must both be (n_spec, {n_pix}) "
            f"or ({n_pix},) (the MDN's wavelength grid)"
        )
    f2, e2 = np.atleast_2d(f), np.atleast_2d(e)
    bad = ~np.isfinite(f2) | ~np.isfinite(e2) | ~(e2 > 0)
    if mask is not None:
        m = np.asarray(mask)
        if m.dtype != bool or m.shape not in ((n_pix,), f.shape, f2.shape):
            raise ValueError(
                f"mask must be bool ({n_pix},) or the shape of flux {f.shape}, got "
                f"{m.dtype} {m.shape}"
            )
        bad = bad | np.broadcast_to(m, f2.shape)
    return np.where(bad, 0.0, f2), np.where(bad, 1.0, e2), bad


@dataclasses.dataclass(frozen=True, kw_only=True)
class MDNConfig:
    """Settings of :func:`train_mdn` (stored in the MDN's ``meta``)."""

    n_train: int = 100_000
    n_valid: int = 10_000
    snr_range: tuple[float, float] = (10.0, 300.0)
    rv_range: tuple[float, float] = (-500.0, 500.0)
    n_components: int = 1
    n_pca: int = 48
    hidden: tuple[int, ...] = (256, 256)
    epochs: int = 200
    batch_size: int = 512
    learning_rate: float = 1e-3
    patience: int = 15
    tilt: float = 0.05
    mask_chunks: int = 8
    seed: int = 0

    def __post_init__(self):
        check_net_config(
            self, ("n_train", "n_valid", "n_components", "n_pca", "epochs")
        )
        s = tuple(float(v) for v in self.snr_range)
        if len(s) != 2 or not 0 < s[0] <= s[1]:
            raise ValueError(f"snr_range must be (lo, hi) with 0 < lo <= hi, got {s}")
        r = check_rv_range(self.rv_range)
        if self.tilt < 0 or self.mask_chunks < 0:
            raise ValueError("tilt and mask_chunks must be >= 0")
        object.__setattr__(self, "snr_range", s)
        object.__setattr__(self, "rv_range", r)


def check_net_config(cfg, int_names) -> None:
    """The checks the MDN's and the flow's training settings share: ``int_names``
    positive ints, ``batch_size`` and ``patience`` > 0, ``hidden`` positive widths
    (stored as a tuple), ``learning_rate`` > 0.

    Raises:
        ValueError: naming the setting.
    """
    for name in int_names:
        v = getattr(cfg, name)
        if isinstance(v, bool) or int(v) != v or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    for name in ("batch_size", "patience"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"{name} must be > 0, got {getattr(cfg, name)!r}")
    hidden = (cfg.hidden,) if isinstance(cfg.hidden, int) else cfg.hidden
    if not hidden or any(int(h) <= 0 for h in hidden):
        raise ValueError(f"hidden must be positive width(s), got {cfg.hidden!r}")
    if not cfg.learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {cfg.learning_rate!r}")
    object.__setattr__(cfg, "hidden", tuple(int(h) for h in hidden))


def simulate(emulator, n: int, *, rng, snr_range, rv_range, tilt=0.05, mask_chunks=8):
    """Noisy observed spectra from ``emulator`` (the MDN's training distribution).

    Labels uniform in the training box; rv uniform in ``rv_range`` (relativistic
    shift, a band-limited interpolation of the rest-frame spectrum,
    :data:`SIM_DOPPLER`; pixels shifted off the grid or into a gap are masked); a
    multiplicative tilt ``1 + a x + b x^2``
    (``x`` in [-1, 1], a, b uniform in +-``tilt``); Gaussian noise of constant
    ``1 / snr`` with S/N log-uniform in ``snr_range``; up to ``mask_chunks`` masked
    chunks of 1-2 % of the pixels, up to ``P / 40`` short runs of 1-6 pixels (as sky
    line and bad-pixel masks, which cut lines in part) and up to 1 % random pixels.

    Returns:
        dict: ``scaled`` (n, L) labels in [-0.5, 0.5], ``labels`` (n, L) physical,
        ``rv`` (n,), ``snr`` (n,), ``flux``, ``err`` (n, P), ``mask`` (n, P) bool.
    """
    L, P = emulator.n_labels, emulator.n_pix
    s = rng.uniform(-0.5, 0.5, (n, L))
    rv = rng.uniform(rv_range[0], rv_range[1], n)
    snr = np.exp(rng.uniform(np.log(snr_range[0]), np.log(snr_range[1]), n))
    rest = emulator.predict(emulator.unscale(s), allow_outside=True)
    dt = rest.dtype
    grid = dataclasses.replace(
        grid_model(emulator.wavelength, max(abs(v) for v in rv_range) + 10.0, dt),
        interp=SIM_DOPPLER,
    )
    flux, valid = shift_batch(grid, jnp.asarray(rest), jnp.asarray(rv, dt))
    flux, valid = np.asarray(flux, np.float64), np.asarray(valid)
    x = np.linspace(-1.0, 1.0, P)
    ab = rng.uniform(-tilt, tilt, (n, 2))
    flux = flux * (1.0 + ab[:, :1] * x + ab[:, 1:] * (x * x - 1.0 / 3.0))
    err = np.repeat((1.0 / snr)[:, None], P, axis=1)
    flux = flux + err * rng.standard_normal((n, P))
    mask = ~valid
    if mask_chunks:
        # chunks of 1-2 % of the pixels, and many short runs (1-6 pixels, up to
        # ~10 % of the pixels) like masks of sky lines and bad pixels, which cut
        # lines in part
        n_short = P // 40
        k = np.concatenate(
            [
                rng.integers(P // 100, P // 50 + 2, (n, mask_chunks)),
                rng.integers(1, 7, (n, n_short)),
            ],
            axis=1,
        )
        use = np.concatenate(
            [
                np.arange(mask_chunks)[None] < rng.integers(0, mask_chunks + 1, (n, 1)),
                np.arange(n_short)[None] < rng.integers(0, n_short + 1, (n, 1)),
            ],
            axis=1,
        )
        a = rng.integers(0, P, k.shape)
        edge = np.zeros((n, P + 1), np.int32)
        rows = np.broadcast_to(np.arange(n)[:, None], k.shape)
        np.add.at(edge, (rows[use], a[use]), 1)
        np.add.at(edge, (rows[use], np.minimum(a + k, P)[use]), -1)
        mask |= np.cumsum(edge, axis=1)[:, :P] > 0
        mask |= rng.random((n, P)) < rng.uniform(0.0, 0.01, (n, 1))
    return dict(
        scaled=s,
        labels=emulator.unscale(s),
        rv=rv,
        snr=snr,
        flux=flux,
        err=err,
        mask=mask,
    )


def _pca_basis(emulator, rng, n_pca: int, n_spec: int = 3000):
    """Mean spectrum (P,) and orthonormal basis (P, n_pca + 2) of rest-frame spectra."""
    s = rng.uniform(-0.5, 0.5, (n_spec, emulator.n_labels))
    f = np.asarray(emulator.predict(emulator.unscale(s), allow_outside=True), float)
    mean = f.mean(axis=0)
    x = np.linspace(-1.0, 1.0, f.shape[1])
    trends = np.stack([x, x * x - 1.0 / 3.0, np.gradient(mean)], axis=1)
    # randomized SVD (Halko et al. 2011): the full SVD of (3000, 7214) took 17 s
    a = f - mean
    k = min(n_pca, *a.shape)
    q, _ = np.linalg.qr(a @ rng.standard_normal((a.shape[1], k + 10)))
    for _ in range(2):
        q, _ = np.linalg.qr(a @ (a.T @ q))
    _, _, vt = np.linalg.svd(q.T @ a, full_matrices=False)
    basis, _ = np.linalg.qr(np.concatenate([vt[:k].T, trends], axis=1))
    return mean, basis


def _init_mlp(rng, sizes):
    ws, bs = [], []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        ws.append(rng.normal(0.0, 1.0 / np.sqrt(a), (a, b)).astype(np.float32))
        bs.append(np.zeros(b, np.float32))
    ws[-1] *= 0.1
    return MLP(tuple(ws), tuple(bs))


def _targets(sim, rv_ccf):
    return np.concatenate(
        [sim["scaled"], ((sim["rv"] - rv_ccf) / RV_OUT_SCALE)[:, None]], axis=1
    )


def sim_features(emulator, mdn_parts, n, rng, cfg, chunk=2048, bar=None):
    """Features (n, D) and targets (n, L + 1), simulated ``chunk`` spectra at a time."""
    grid, fx, rc, rf = mdn_parts
    dt = fx.mean.dtype
    feats, targ = [], []
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        sim = simulate(
            emulator,
            chunk,
            rng=rng,
            snr_range=cfg.snr_range,
            rv_range=cfg.rv_range,
            tilt=cfg.tilt,
            mask_chunks=cfg.mask_chunks,
        )
        f, e, bad = _check_spectra(sim["flux"], sim["err"], sim["mask"], emulator.n_pix)
        feat, rv = features_batch(
            grid,
            fx,
            rc,
            rf,
            jnp.asarray(f, dt),
            jnp.asarray(e, dt),
            jnp.asarray(bad),
        )
        feats.append(np.asarray(feat)[:m])
        targ.append(_targets(sim, np.asarray(rv, np.float64))[:m])
        if bar is not None:
            bar.update(m)
    return np.concatenate(feats), np.concatenate(targ).astype(np.float32)


def train_mdn(emulator, *, config: MDNConfig | None = None, progress=True, **kw) -> MDN:
    """Train an :class:`MDN` on spectra simulated from ``emulator``.

    Args:
        emulator: the :class:`payne_lite.Emulator` whose labels the MDN predicts.
        config: an :class:`MDNConfig`; or its fields as keyword arguments
            (``n_train``, ``n_valid``, ``snr_range``, ``rv_range``, ``seed``,
            ``epochs``, ``batch_size``, ``learning_rate``, ``patience``,
            ``n_components``, ``n_pca``, ``hidden``, ``tilt``, ``mask_chunks``).
        progress: tqdm progress bars (simulation, epochs).

    Returns:
        The MDN with the parameters of the lowest validation NLL; ``history`` holds
        ``train_nll`` and ``valid_nll`` per epoch (mean per spectrum, scaled units).

    Raises:
        ValueError: bad settings (named), or ``config`` and keywords both given.
        TrainingDivergedError: the training or validation NLL became NaN or
            infinite (the run stops instead of returning a half-trained MDN).
    """
    from tqdm.auto import tqdm

    if config is not None and kw:
        raise ValueError(
            f"pass config or keyword settings, not both (got {sorted(kw)})"
        )
    cfg = config or MDNConfig(**kw)
    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    provisional = _provisional_mdn(emulator, cfg, rng)
    _, grid, fx, rc, rf = provisional._device(np.float32)
    bar = tqdm(
        total=cfg.n_train + cfg.n_valid,
        desc="simulate",
        unit="spectrum",
        disable=not progress,
    )
    with bar:
        x_tr, y_tr = sim_features(
            emulator, (grid, fx, rc, rf), cfg.n_train, rng, cfg, bar=bar
        )
        x_va, y_va = sim_features(
            emulator, (grid, fx, rc, rf), cfg.n_valid, rng, cfg, bar=bar
        )
    t_sim = time.perf_counter() - t0
    mu = x_tr.mean(axis=0)
    sd = x_tr.std(axis=0)
    # A feature constant up to rounding (the fine CCF at its peak, normalised to it:
    # spread 2e-8) would amplify float rounding by 1e7 and make a row's answer depend
    # on the batch it is in: such features are switched off (sd = inf -> input 0).
    sd = np.where(sd > FEATURE_SD_MIN, sd, np.inf)
    x_tr = ((x_tr - mu) / sd).astype(np.float32)
    x_va = ((x_va - mu) / sd).astype(np.float32)

    n_dim, n_comp = emulator.n_labels + 1, cfg.n_components

    def loss_fn(net, x, y):
        out = jax.vmap(mlp_forward, in_axes=(None, 0))(net, x)
        return jnp.mean(mixture_nll(*mixture_params(out, n_dim, n_comp), y))

    best, best_net, hist_tr, hist_va = fit_net(
        jax.tree.map(jnp.asarray, provisional.net),
        (x_tr, y_tr),
        (x_va, y_va),
        cfg,
        loss_fn=loss_fn,
        rng=rng,
        progress=progress,
    )
    t_total = time.perf_counter() - t0
    log.info("MDN trained: valid NLL %.3f after %d epochs", best, len(hist_va))
    meta = dict(
        config={
            k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(cfg).items()
        },
        emulator_source=str(
            emulator.meta.get("source", emulator.meta.get("trained_by", ""))
        ),
        trained_by="payne_lite.train_mdn",
        simulate_seconds=round(t_sim, 2),
        train_seconds=round(t_total, 2),
        best_valid_nll=float(best),
        epochs_run=len(hist_va),
    )
    return dataclasses.replace(
        provisional,
        net=jax.tree.map(np.asarray, best_net),
        feat_mu=mu,
        feat_sd=sd,
        history={"train_nll": np.array(hist_tr), "valid_nll": np.array(hist_va)},
        meta=meta,
    )


def _provisional_mdn(emulator, cfg: MDNConfig, rng) -> MDN:
    """An MDN with the PCA basis, a freshly initialised MLP and unit standardisation.

    Feature extraction needs feat_mu/sd only after the features exist: this
    provisional MDN builds the fixed arrays (:meth:`MDN._device`) that simulate the
    training features. Draws from ``rng``: the PCA spectra, then the MLP weights.
    """
    mean, basis = _pca_basis(emulator, rng, cfg.n_pca)
    n_dim = emulator.n_labels + 1
    n_out = 3 * cfg.n_components * n_dim
    n_feat = basis.shape[1] + len(rv_grids(cfg.rv_range)[1]) + 4
    return MDN(
        net=_init_mlp(rng, (n_feat, *cfg.hidden, n_out)),
        mean_flux=mean,
        basis=basis,
        feat_mu=np.zeros(n_feat),
        feat_sd=np.ones(n_feat),
        label_names=emulator.label_names,
        label_units=emulator.label_units,
        label_lo=emulator.label_lo,
        label_hi=emulator.label_hi,
        wavelength=emulator.wavelength,
        rv_range=cfg.rv_range,
        n_components=cfg.n_components,
    )


def fit_net(net, train, valid, cfg, *, loss_fn, rng, progress, name="train_mdn"):
    """Adam on ``loss_fn`` with early stopping on the validation loss (the MDN's
    mixture NLL, the flow's NLL).

    Args:
        net: the initial parameters (a pytree of device arrays).
        train, valid: ``(x, y)`` standardised features (n, D) and scaled targets
            (n, n_dim), float32.
        cfg: the settings (epochs, batch_size, learning_rate, patience, n_train).
        loss_fn: ``loss_fn(net, x, y)``, the mean loss per spectrum of a batch.
        rng: NumPy generator for the epochs' permutations.
        progress: a tqdm bar over epochs.
        name: the error message's name (the bar's with "-" for "_").

    Returns:
        ``(best, best_net, hist_tr, hist_va)``: the lowest validation NLL, the
        parameters that gave it, and the per-epoch training and validation NLL
        (mean per spectrum, scaled units).

    Raises:
        TrainingDivergedError: a non-finite training or validation NLL.
    """
    from tqdm.auto import tqdm

    x_tr, y_tr = train
    x_va, y_va = valid
    n_steps = cfg.epochs * max(1, cfg.n_train // cfg.batch_size)
    sched = optax.cosine_decay_schedule(cfg.learning_rate, n_steps, alpha=0.05)
    opt = optax.adam(sched)
    opt_state = opt.init(net)

    @jax.jit
    def step(net, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(net, x, y)
        updates, opt_state = opt.update(grads, opt_state, net)
        return optax.apply_updates(net, updates), opt_state, loss

    @jax.jit
    def valid_loss(net, x, y):
        return loss_fn(net, x, y)

    x_va_j, y_va_j = jnp.asarray(x_va), jnp.asarray(y_va)
    bs = min(cfg.batch_size, cfg.n_train)
    n_batch = max(1, cfg.n_train // bs)
    hist_tr, hist_va = [], []
    best, best_net, since = np.inf, net, 0
    bar = tqdm(
        range(cfg.epochs),
        desc=name.replace("_", "-"),
        unit="epoch",
        disable=not progress,
    )
    for _epoch in bar:
        perm = rng.permutation(cfg.n_train)
        tot = jnp.zeros(())
        for b in range(n_batch):
            idx = perm[b * bs : (b + 1) * bs]
            net, opt_state, loss = step(
                net, opt_state, jnp.asarray(x_tr[idx]), jnp.asarray(y_tr[idx])
            )
            tot = tot + loss
        tr = float(tot) / n_batch
        va = float(valid_loss(net, x_va_j, y_va_j))
        if not (np.isfinite(tr) and np.isfinite(va)):
            from ..errors import TrainingDivergedError

            raise TrainingDivergedError(
                f"{name} diverged at epoch {_epoch + 1}: training NLL {tr:.4g}, "
                f"validation NLL {va:.4g} (the best so far was {best:.4g} after "
                f"{len(hist_va)} epoch(s)); a smaller learning_rate, or check the "
                "emulator for non-finite spectra"
            )
        hist_tr.append(tr)
        hist_va.append(va)
        bar.set_postfix(train=f"{tr:.3f}", valid=f"{va:.3f}")
        if va < best - 1e-4:
            best, best_net, since = va, net, 0
        else:
            since += 1
            if since >= cfg.patience:
                break
    return best, best_net, hist_tr, hist_va
