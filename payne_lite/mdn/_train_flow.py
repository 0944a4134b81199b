"""Training the MDN's conditional flow (:mod:`payne_lite.mdn._flow`) on simulated
spectra: the MDN's training distribution, its fixed features, maximum likelihood
with Adam and early stopping (the MDN's loop, :func:`._train.fit_net`)."""

from __future__ import annotations

import dataclasses
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from ._flow import Flow, init_flow_net, nll_batch
from ._mdn import MDN
from ._train import MDNConfig, check_net_config, fit_net, sim_features

log = logging.getLogger("payne_lite.mdn")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FlowConfig:
    """Settings of :func:`train_flow` (stored in the flow's ``meta``).

    The simulated spectra follow the MDN's own training settings (S/N range, rv
    range, tilt, masks: its ``meta["config"]``), so the flow is trained where the
    MDN's features were standardised.
    """

    n_train: int = 100_000
    n_valid: int = 10_000
    n_layers: int = 5
    hidden: tuple[int, ...] = (128, 128)
    n_context: int = 64
    epochs: int = 200
    batch_size: int = 512
    learning_rate: float = 1e-3
    patience: int = 15
    seed: int = 1

    def __post_init__(self):
        check_net_config(
            self, ("n_train", "n_valid", "n_layers", "n_context", "epochs")
        )


def _sim_config(mdn: MDN) -> MDNConfig:
    """The MDN's simulation settings (its defaults where its meta has none)."""
    stored = dict(mdn.meta.get("config", {}))
    keep = {"snr_range", "tilt", "mask_chunks"}
    return MDNConfig(
        rv_range=mdn.rv_range, **{k: v for k, v in stored.items() if k in keep}
    )


def train_flow(
    emulator, mdn: MDN, *, config: FlowConfig | None = None, progress=True, **kw
) -> MDN:
    """Train a conditional flow for ``mdn`` (the joint posterior of its labels and rv
    given a spectrum's features) and return the MDN with it attached.

    Args:
        emulator: the :class:`payne_lite.Emulator` the MDN was trained for.
        mdn: the trained :class:`MDN` (its features and standardisation are used).
        config: a :class:`FlowConfig`; or its fields as keyword arguments.
        progress: tqdm progress bars (simulation, epochs).

    Returns:
        ``dataclasses.replace(mdn, flow=...)``: the flow with the lowest validation
        NLL; its ``history`` holds ``train_nll`` and ``valid_nll`` per epoch (per
        spectrum, standardised target units).

    Raises:
        ValueError: bad settings, ``config`` and keywords both given, or an emulator
            the MDN was not trained for.
        TrainingDivergedError: the NLL became NaN or infinite.
    """
    from tqdm.auto import tqdm

    if config is not None and kw:
        raise ValueError(
            f"pass config or keyword settings, not both (got {sorted(kw)})"
        )
    cfg = config or FlowConfig(**kw)
    mdn.check_emulator(emulator)
    sim_cfg = _sim_config(mdn)
    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    _, grid, fx, rc, rf = mdn._device(np.float32)
    parts = (grid, fx, rc, rf)
    n_all = cfg.n_train + cfg.n_valid
    bar = tqdm(total=n_all, desc="simulate", unit="spectrum", disable=not progress)
    with bar:
        x_tr, y_tr = sim_features(emulator, parts, cfg.n_train, rng, sim_cfg, bar=bar)
        x_va, y_va = sim_features(emulator, parts, cfg.n_valid, rng, sim_cfg, bar=bar)
    t_sim = time.perf_counter() - t0
    feat_mu, feat_sd = mdn.feat_mu.astype(np.float32), mdn.feat_sd.astype(np.float32)
    x_tr = ((x_tr - feat_mu) / feat_sd).astype(np.float32)
    x_va = ((x_va - feat_mu) / feat_sd).astype(np.float32)
    y_mu = y_tr.astype(np.float64).mean(axis=0)
    y_sd = y_tr.astype(np.float64).std(axis=0)
    y_tr = ((y_tr - y_mu) / y_sd).astype(np.float32)
    y_va = ((y_va - y_mu) / y_sd).astype(np.float32)

    net0 = init_flow_net(
        rng, x_tr.shape[1], y_tr.shape[1], cfg.n_context, cfg.hidden, cfg.n_layers
    )
    best, best_net, hist_tr, hist_va = fit_net(
        jax.tree.map(jnp.asarray, net0),
        (x_tr, y_tr),
        (x_va, y_va),
        cfg,
        loss_fn=nll_batch,
        rng=rng,
        progress=progress,
        name="train_flow",
    )
    log.info("flow trained: valid NLL %.3f after %d epochs", best, len(hist_va))
    meta = dict(
        config={
            k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(cfg).items()
        },
        trained_by="payne_lite.train_flow",
        simulate_seconds=round(t_sim, 2),
        train_seconds=round(time.perf_counter() - t0, 2),
        best_valid_nll=float(best),
        epochs_run=len(hist_va),
    )
    flow = Flow(
        net=jax.tree.map(np.asarray, best_net),
        y_mu=y_mu,
        y_sd=y_sd,
        history={"train_nll": np.array(hist_tr), "valid_nll": np.array(hist_va)},
        meta=meta,
    )
    return dataclasses.replace(mdn, flow=flow)
