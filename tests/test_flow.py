"""Tests for the MDN's conditional flow (payne_lite.mdn._flow) and flow-is.

* The density against independent references: the change of variables with the
  Jacobian from ``jax.jacfwd`` (not the code's own log-determinant bookkeeping), a
  numerical integral over the plane (it must be 1), the inverse map, the
  autoregressive structure of one layer.
* Training: a flow learns a known conditional Gaussian (heteroscedastic, correlated)
  to within a small KL.
* Files: an MDN with a flow round-trips (version 3), one without is version 2, a
  damaged flow group is refused.
* flow-is: with a flat likelihood the posterior is the prior (uniform box, uniform
  RV window), whatever the (correlated, off-centre) flow proposes.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_HI, TINY_LO, TINY_NAMES, restamp
from test_sample import StandInMDN, linear_emulator

import payne_lite as pl
from payne_lite.errors import FileFormatError
from payne_lite.mdn import Flow
from payne_lite.mdn import _flow as flow_mod
from payne_lite.mdn._train import fit_net

SPAN = TINY_HI - TINY_LO


def random_flow(rng, n_feat=3, d=2, n_ctx=4, hidden=(16,), n_layers=3, scale=0.5):
    """A flow with random weights of moderate size (far from the identity)."""
    net = flow_mod.init_flow_net(rng, n_feat, d, n_ctx, hidden, n_layers)
    net = jax.tree.map(
        lambda a: (a + scale * rng.standard_normal(a.shape)).astype(np.float32), net
    )
    return net


@pytest.fixture(scope="module")
def net2():
    return random_flow(np.random.default_rng(0))


def test_log_prob_is_the_change_of_variables(net2):
    """log q(y) = log N(z(y)) + log |det dz/dy|, the Jacobian from jax.jacfwd."""
    rng = np.random.default_rng(1)
    c = flow_mod.embed_context(net2, jnp.asarray(rng.normal(size=3)))
    for y in rng.normal(size=(5, 2)):
        y = jnp.asarray(y)
        z, _ = flow_mod.to_base(net2, c, y)
        jac = jax.jacfwd(lambda v: flow_mod.to_base(net2, c, v)[0])(y)
        want = -0.5 * float(z @ z) - np.log(2 * np.pi) + np.linalg.slogdet(jac)[1]
        got = float(flow_mod.log_prob(net2, c, y))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        # a widened base: log N(z; 0, s^2 I)
        s = 1.7
        want_s = want + 0.5 * float(z @ z) * (1 - 1 / s**2) - 2 * np.log(s)
        got_s = float(flow_mod.log_prob(net2, c, y, s))
        np.testing.assert_allclose(got_s, want_s, rtol=1e-5, atol=1e-5)


def test_density_integrates_to_one(net2):
    """Midpoint rule over a square that holds the mass (checked: the draws)."""
    c = flow_mod.embed_context(net2, jnp.asarray([0.3, -1.0, 0.5]))
    z = np.random.default_rng(2).standard_normal((4000, 2))
    y = np.asarray(flow_mod.from_base(net2, c, jnp.asarray(z)))
    lo, hi = np.quantile(y, 0.0005, axis=0), np.quantile(y, 0.9995, axis=0)
    pad = 0.6 * (hi - lo)
    g = [np.linspace(a - p, b + p, 500) for a, b, p in zip(lo, hi, pad, strict=True)]
    yy = np.stack(np.meshgrid(*g, indexing="ij"), -1).reshape(-1, 2)
    q = np.exp(np.asarray(flow_mod.log_prob(net2, c, jnp.asarray(yy))))
    integral = q.sum() * np.prod([gi[1] - gi[0] for gi in g])
    assert abs(integral - 1.0) < 5e-3, integral


def test_from_base_inverts_to_base_and_layers_are_autoregressive():
    rng = np.random.default_rng(3)
    d = 5
    net = random_flow(rng, n_feat=4, d=d, n_ctx=3, hidden=(24, 24), n_layers=4)
    with jax.enable_x64(True):  # exact to rounding (float32 amplifies it by e^4/layer)
        n64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), net)
        c = flow_mod.embed_context(n64, jnp.asarray(rng.normal(size=4)))
        y = jnp.asarray(rng.normal(size=(50, d)))
        z, _ = flow_mod.to_base(n64, c, y)
        np.testing.assert_allclose(flow_mod.from_base(n64, c, z), y, atol=1e-10)
    c = flow_mod.embed_context(net, jnp.asarray(rng.normal(size=4), jnp.float32))
    y = jnp.asarray(rng.normal(size=(50, d)), jnp.float32)
    # one MADE layer: output j (shift and log-scale) depends on y[:j] only
    jac = jax.jacfwd(lambda v: jnp.concatenate(flow_mod._made(net.made[0], v, c)))(y[0])
    for j in range(d):
        for part in (jac[j], jac[d + j]):
            assert np.all(np.asarray(part[j:]) == 0.0), (j, part)
    # the first dimension's shift sees the context (degree-0 hidden units)
    grad_c = jax.jacfwd(lambda cc: flow_mod._made(net.made[0], y[0], cc)[0][0])(c)
    assert np.any(np.asarray(grad_c) != 0.0)


def test_flow_learns_a_conditional_gaussian():
    """y | c ~ N(A c, s(c)^2 L L^T): the trained flow's log density within 0.15 nat
    of the truth's (median over held-out pairs)."""
    from scipy.stats import multivariate_normal

    rng = np.random.default_rng(0)
    lmat = np.array([[1.0, 0, 0], [0.8, 0.6, 0], [-0.5, 0.3, 0.8]])

    def make(n):
        c = rng.normal(size=(n, 3)).astype(np.float32)
        mean = np.stack([c[:, 0], 0.5 * c[:, 1] - c[:, 0], 0.3 * c[:, 2]], 1)
        s = 0.3 * np.exp(0.3 * c[:, :1])
        y = mean + s * (rng.normal(size=(n, 3)) @ lmat.T)
        return c, y.astype(np.float32), mean, s

    c, y, *_ = make(10000)
    cv, yv, *_ = make(2000)
    cfg = SimpleNamespace(
        epochs=30, batch_size=256, learning_rate=3e-3, patience=10, n_train=10000
    )
    net0 = jax.tree.map(jnp.asarray, flow_mod.init_flow_net(rng, 3, 3, 16, (64, 64), 4))
    _, net, _, hist = fit_net(
        net0, (c, y), (cv, yv), cfg, loss_fn=flow_mod.nll_batch, rng=rng,
        progress=False, name="test",
    )  # fmt: skip
    ct, yt, mean, s = make(500)
    cov = lmat @ lmat.T
    want = np.array(
        [
            multivariate_normal(mean[i], s[i, 0] ** 2 * cov).logpdf(yt[i])
            for i in range(500)
        ]
    )
    got = np.asarray(
        jax.vmap(
            lambda a, b: flow_mod.log_prob(net, flow_mod.embed_context(net, a), b)
        )(jnp.asarray(ct), jnp.asarray(yt))
    )
    assert hist[-1] < hist[0]
    assert np.median(np.abs(got - want)) < 0.15
    assert abs(np.mean(got) - np.mean(want)) < 0.15  # KL(truth || flow) < 0.15 nat


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def default_mdn():
    from payne_lite.demo import default_mdn_path

    return pl.MDN.load(default_mdn_path())


def attach_random_flow(mdn, seed=0):
    rng = np.random.default_rng(seed)
    d, n_feat = mdn.n_labels + 1, mdn.net.weights[0].shape[0]
    net = random_flow(rng, n_feat=n_feat, d=d, n_ctx=8, hidden=(16,), n_layers=2)
    flow = Flow(
        net=net,
        y_mu=rng.normal(size=d),
        y_sd=rng.uniform(0.5, 2.0, d),
        history={"valid_nll": np.arange(3.0)},
        meta={"trained_by": "test"},
    )
    return dataclasses.replace(mdn, flow=flow)


def test_mdn_with_flow_round_trips(default_mdn, tmp_path):
    mdn = attach_random_flow(default_mdn)
    path = tmp_path / "m.h5"
    mdn.save(path)
    with h5py.File(path) as f:
        assert f.attrs["format_version"] == 3 and "flow" in f
    back = pl.MDN.load(path)
    assert back.flow is not None and back.flow.meta == {"trained_by": "test"}
    rng = np.random.default_rng(5)
    feat = rng.normal(size=mdn.net.weights[0].shape[0])
    y = rng.normal(size=(7, mdn.n_labels + 1))
    np.testing.assert_array_equal(
        back.flow.log_prob(feat, y, 1.3), mdn.flow.log_prob(feat, y, 1.3)
    )
    z = rng.normal(size=(7, mdn.n_labels + 1))
    np.testing.assert_array_equal(
        back.flow.from_base(feat, z), mdn.flow.from_base(feat, z)
    )
    # draws and density agree: log q of y (target units) = the base density of z
    # less log |det| of the standardisation and the flow (checked above)
    # without a flow: version 2, read as before
    default_mdn.save(tmp_path / "plain.h5")
    with h5py.File(tmp_path / "plain.h5") as f:
        assert f.attrs["format_version"] == 2 and "flow" not in f
    assert pl.MDN.load(tmp_path / "plain.h5").flow is None


def test_damaged_flow_group_is_refused(default_mdn, tmp_path):
    path = tmp_path / "m.h5"
    attach_random_flow(default_mdn).save(path)
    with h5py.File(path, "a") as f:
        del f["flow"]["made1_W0"]
    restamp(path)
    with pytest.raises(FileFormatError, match="made1_W0"):
        pl.MDN.load(path)
    with h5py.File(path, "a") as f:
        del f["flow"].attrs["n_made"]
    restamp(path)
    with pytest.raises(
        FileFormatError, match=r"flow group without attribute\(s\) \['n_made'\]"
    ):
        pl.MDN.load(path)


def test_flow_of_another_shape_is_refused(default_mdn):
    flow = attach_random_flow(default_mdn).flow
    small = Flow(
        net=random_flow(np.random.default_rng(1), n_feat=5, d=3, n_ctx=2),
        y_mu=np.zeros(3),
        y_sd=np.ones(3),
    )
    with pytest.raises(ValueError, match="does not match the MDN's 6 outputs"):
        dataclasses.replace(default_mdn, flow=small)
    with pytest.raises(ValueError, match="y_sd must be"):
        Flow(net=flow.net, y_mu=flow.y_mu, y_sd=-flow.y_sd)
    with pytest.raises(ValueError, match="has no flow"):
        default_mdn.flow_sample(np.ones(default_mdn.n_pix), np.ones(default_mdn.n_pix))


# --------------------------------------------------------------------------------------
# flow-is
# --------------------------------------------------------------------------------------
class StandInFlowMDN(StandInMDN):
    """The stand-in MDN with a flow: a random, correlated flow whose context is
    fixed (zero features, ``rv_ccf`` 0)."""

    def __init__(self, mean, sigma, flow):
        super().__init__(mean, sigma)
        self.flow = flow

    def _need_flow(self):
        return self.flow

    def flow_context(self, flux, flux_err, mask=None):
        n = np.atleast_2d(flux).shape[0]
        n_feat = self.flow.net.embed.weights[0].shape[0]
        return np.zeros((n, n_feat), np.float32), np.zeros(n), np.ones(n, bool)


@pytest.mark.parametrize("is_adapt", [0, 1])
def test_flow_is_flat_likelihood_gives_the_prior_back(is_adapt):
    """The flux does not depend on the labels or rv (a flat model, rv's window of
    +-20 km/s about the MDN's 0): the posterior is uniform on the box and the
    window. The flow proposes a correlated density centred off the middle."""
    emu = linear_emulator(slope=0.0)
    flux, err = np.ones(emu.n_pix), np.full(emu.n_pix, 0.01)
    rng = np.random.default_rng(4)
    flow = Flow(
        net=random_flow(
            rng, n_feat=3, d=4, n_ctx=2, hidden=(8,), n_layers=2, scale=0.2
        ),
        y_mu=np.array([0.2, -0.1, 0.1, 5.0]),
        y_sd=np.array([0.35, 0.35, 0.35, 20.0]),
    )
    mdn = StandInFlowMDN(np.r_[0.5 * (TINY_LO + TINY_HI), 0.0], np.r_[SPAN, 10.0], flow)
    t, post = pl.sample(
        flux, err, emu, method="flow-is", mdn=mdn, seed=3, return_samples=True,
        options=pl.ISOptions(n_draws=40000, ess_min=100, adapt=is_adapt, lm_share=0.0),
    )  # fmt: skip
    assert t["method"][0] == "flow-is" and not t["fallback"][0]
    assert t.meta["options"]["scale"] == 1.0  # FLOW_IS_SCALE, the trained density
    for j, name in enumerate(TINY_NAMES):
        mid, sd = 0.5 * (TINY_LO[j] + TINY_HI[j]), SPAN[j] / np.sqrt(12)
        assert abs(t[f"{name}_p50"][0] - mid) < 0.05 * SPAN[j]
        assert abs(t[f"{name}_std"][0] / sd - 1) < 0.05
        assert abs(t[f"{name}_p16"][0] - (TINY_LO[j] + 0.16 * SPAN[j])) < 0.05 * SPAN[j]
    assert abs(t["rv_p50"][0]) < 0.05 * 40.0
    assert abs(t["rv_std"][0] / (40.0 / np.sqrt(12)) - 1) < 0.05
    assert np.isclose(post.weights[0].sum(), 1.0)


def test_flow_proposal_spread_without_stage0_flow_draws():
    """With lm_share near 1 stage 0 draws (almost) nothing from the flow; the
    adapted stages still need its spread: then from FLOW_SPREAD_DRAWS of its own,
    finite, and the same every time (not NaN from an empty draw)."""
    from payne_lite.posterior import _is as is_mod

    flow = Flow(
        net=random_flow(np.random.default_rng(2), n_feat=3, d=4, n_ctx=2),
        y_mu=np.zeros(4),
        y_sd=np.array([0.1, 0.1, 0.1, 5.0]),
    )
    prop = is_mod.FlowProposal(flow, np.zeros(3, np.float32), 30.0, 1.0, 3)
    assert prop.draw(np.random.default_rng(1), 0).shape == (0, 4)
    spread = prop.spread
    assert spread.shape == (4,) and np.all(np.isfinite(spread) & (spread > 0))
    ref = is_mod.FlowProposal(flow, np.zeros(3, np.float32), 30.0, 1.0, 3)
    x = ref.draw(np.random.default_rng(0), is_mod.FLOW_SPREAD_DRAWS)
    np.testing.assert_allclose(spread, np.std(x, axis=0))
    prop.draw(np.random.default_rng(3), 2)  # too few: the spread stays
    np.testing.assert_array_equal(prop.spread, spread)


def test_is_scale_default_follows_the_method():
    from payne_lite.options import FLOW_IS_SCALE, IS_SCALE

    o = pl.ISOptions()
    assert o.scale is None
    assert o.scale_for("flow-is") == FLOW_IS_SCALE == 1.0
    assert o.scale_for("mdn-is") == IS_SCALE == 1.5
    assert pl.ISOptions(scale=2.0).scale_for("flow-is") == 2.0


def test_flow_is_refuses_what_the_flow_cannot_propose():
    emu = linear_emulator()
    flux, err = np.ones(emu.n_pix), np.full(emu.n_pix, 0.01)
    with pytest.raises(ValueError, match="has no flow"):
        pl.sample(flux, err, emu, method="flow-is", mdn=pl.MDN.load(_default_path()))
    flow = Flow(
        net=random_flow(np.random.default_rng(0), n_feat=3, d=4, n_ctx=2),
        y_mu=np.zeros(4),
        y_sd=np.ones(4),
    )
    mdn = StandInFlowMDN(np.r_[0.5 * (TINY_LO + TINY_HI), 0.0], np.r_[SPAN, 10.0], flow)
    with pytest.raises(ValueError, match="flow-is' samples every label and rv"):
        pl.sample(flux, err, emu, method="flow-is", mdn=mdn, fixed={"rv": 0.0})
    with pytest.raises(ValueError, match="flow-is' samples no continuum"):
        pl.sample(flux, err, emu, method="flow-is", mdn=mdn, cont_deg=1)


def _default_path():
    from payne_lite.demo import default_mdn_path

    return default_mdn_path()
