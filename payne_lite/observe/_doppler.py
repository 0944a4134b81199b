"""The Doppler shift of a rest-frame model onto an observed grid (pure JAX, one star).

Doppler shift (relativistic): the observed flux at ``lambda_obs`` is the rest-frame
model at ``lambda_obs / f`` with ``f = sqrt((1 + v/c) / (1 - v/c))``, interpolated on
the emulator's grid by a Lanczos-6 windowed sinc (:data:`DOPPLER_INTERP`, twelve rest
pixels per observed pixel; Keys' cubic convolutions are the alternatives): a
band-limited shift, whose value and first derivative are continuous in the
position, so chi2(rv) is smooth, where linear interpolation (still available, and
used by :func:`doppler_shift` and the MDN's features) puts a kink in chi2(rv) at
every pixel crossing. Observed pixels whose taps fall outside the emulator's grid, or
across a gap of it (for example APOGEE's chip gaps), are flagged invalid.

Precision: the wavelengths enter the jitted code as offsets from a reference
wavelength, computed on the host in float64, and ``1/f - 1 = expm1(-atanh(v/c))`` is
formed without cancellation, so that float32 (JAX's default) resolves the shift to
about 1e-3 km/s; on absolute float32 wavelengths near 16000 A the rounding alone
would be about 0.02 km/s.

Two paths (:func:`shift_pair`): per observed pixel, the rest interval found by
binary search or in O(1) with a bucket table (:func:`make_lookup`), the fraction
taken linearly in lambda and the taps on the rest pixels around it; and, when the
rest and observed grids are pixels of one log-uniform grid (:class:`LogGrid`,
:func:`make_log_grid`), a shift that moves every pixel by the same fraction of a
step: one contiguous slice per tap and chip. The observation model that uses them
is :mod:`payne_lite.observe._model`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..constants import C_KMS

#: A step of the rest grid larger than this multiple of the median step (in
#: ln lambda) is a gap: interpolating across it is not allowed.
GAP_FACTOR = 3.0
#: Grids are treated as log-uniform when every pixel lies within this fraction of a
#: step of ``ln(lambda_0) + n * step`` (APOGEE's and the synthesizer's: 1e-7).
LOG_GRID_TOL = 1e-4


class LogGrid(NamedTuple):
    """Rest and observed grids as pixels of one log-uniform grid (static, hashable).

    The rest-frame model is embedded in an array of ``size`` points of that grid
    (zeros in gaps, ``pad`` points of margin each side for the largest shift);
    ``rest`` and ``obs`` list contiguous runs ``(first pixel, first embedded index,
    length)``.
    """

    inv_step: float  # 1 / step in ln(lambda)
    pad: int
    size: int
    rest: tuple[tuple[int, int, int], ...]
    obs: tuple[tuple[int, int, int], ...]


def inv_factor_m1(rv):
    """``1/f - 1`` for the relativistic Doppler factor f, without cancellation."""
    return jnp.expm1(-jnp.arctanh(rv / C_KMS))


def interval(x_rest, xq):
    """Index i of the rest interval [x_i, x_{i+1}] holding xq (clipped to the grid)."""
    n = x_rest.shape[0]
    return jnp.clip(jnp.searchsorted(x_rest, xq, side="right") - 1, 0, n - 2)


def make_lookup(x_rest: np.ndarray, dtype) -> tuple:
    """``(x0, 1/h, table)`` with ``table[b]`` the rest interval at ``x0 + b h``."""
    x = np.asarray(x_rest, dtype=np.float64)
    h = 0.999 * float(np.min(np.diff(x)))
    nb = int(np.ceil((x[-1] - x[0]) / h)) + 2
    table = np.searchsorted(x, x[0] + h * np.arange(nb), side="right") - 1
    table = np.clip(table, 0, x.size - 2).astype(np.int32)
    return (jnp.asarray(x[0], dtype), jnp.asarray(1.0 / h, dtype), jnp.asarray(table))


def interval_lookup(x_rest, lookup, xq):
    """:func:`interval` by bucket table: at most one rest point lies in a bucket, and
    rounding can put ``xq`` in a neighbouring bucket, so one step each way corrects."""
    x0, inv_h, table = lookup
    n = x_rest.shape[0]
    b = jnp.clip(jnp.floor((xq - x0) * inv_h), 0, table.shape[0] - 1).astype(jnp.int32)
    i = table[b]
    i = i + (x_rest[jnp.minimum(i + 1, n - 1)] <= xq)
    i = i + (x_rest[jnp.minimum(i + 1, n - 1)] <= xq)
    i = i - (x_rest[i] > xq)
    return jnp.clip(i, 0, n - 2)


def shift(x_rest, gap_cum, flux_rest, x_obs, wave_obs, rv, lookup=None):
    """Shifted flux and validity on the observed grid (offset wavelengths).

    Linear interpolation, clamped at the grid's ends (as ``jnp.interp``); with a
    ``lookup`` table the interval search is O(1) per pixel instead of a binary search
    (the search dominated the model's cost inside the fitter).
    """
    xq = x_obs + wave_obs * inv_factor_m1(rv)
    if lookup is None:
        i = interval(x_rest, xq)
    else:
        i = interval_lookup(x_rest, lookup, xq)
    xa, xb = x_rest[i], x_rest[i + 1]
    t = jnp.clip((xq - xa) / (xb - xa), 0.0, 1.0)
    fa = flux_rest[i]
    flux = fa + t * (flux_rest[i + 1] - fa)
    inside = (xq >= x_rest[0]) & (xq <= x_rest[-1])
    return flux, inside & (gap_cum[i + 1] - gap_cum[i] == 0)


def gap_cum(wave: np.ndarray) -> np.ndarray:
    dln = np.diff(np.log(wave))
    gap = dln > GAP_FACTOR * np.median(dln)
    return np.concatenate([[0], np.cumsum(gap)]).astype(np.int32)


def index_runs(idx: np.ndarray, offset: int) -> tuple[tuple[int, int, int], ...]:
    """Contiguous runs of integer grid indices as (first pixel, first index, length)."""
    cut = np.flatnonzero(np.diff(idx) != 1) + 1
    first = np.concatenate([[0], cut])
    last = np.concatenate([cut, [idx.size]])
    return tuple(
        (int(a), int(idx[a]) + offset, int(b - a))
        for a, b in zip(first, last, strict=True)
    )


def make_log_grid(wave_rest, wave_obs, rv_max: float) -> LogGrid | None:
    """:class:`LogGrid` for the two grids, or None when they are not on one."""
    ln_r = np.log(np.asarray(wave_rest, np.float64))
    ln_o = np.log(np.asarray(wave_obs, np.float64))
    step = float(np.median(np.diff(ln_r)))
    if not step > 0:
        return None
    u_r = (ln_r - ln_r[0]) / step
    u_o = (ln_o - ln_r[0]) / step
    n_r, n_o = np.round(u_r), np.round(u_o)
    if (
        np.max(np.abs(u_r - n_r)) > LOG_GRID_TOL
        or np.max(np.abs(u_o - n_o)) > LOG_GRID_TOL
        or np.any(np.diff(n_o) < 1)
    ):
        return None
    # margin: the largest shift plus the widest interpolant's taps (TAP_OFFSETS)
    reach = max(max(abs(o) for o in offs) for offs in TAP_OFFSETS.values())
    pad = int(np.ceil(np.arctanh(min(rv_max, 0.5 * C_KMS) / C_KMS) / step)) + reach
    lo = int(min(n_r[0], n_o[0]))
    size = int(max(n_r[-1], n_o[-1])) - lo + 1 + 2 * pad
    return LogGrid(
        inv_step=1.0 / step,
        pad=pad,
        size=size,
        rest=index_runs(n_r.astype(np.int64), pad - lo),
        obs=index_runs(n_o.astype(np.int64), pad - lo),
    )


def embed(lg: LogGrid, m):
    """(..., P_rest) -> (..., lg.size): rest pixels at their grid index, zeros between."""
    xp = np if isinstance(m, np.ndarray) else jnp
    lead = m.shape[:-1]
    parts, pos = [], 0
    for r0, e0, n in lg.rest:
        if e0 > pos:
            parts.append(xp.zeros((*lead, e0 - pos), m.dtype))
        parts.append(m[..., r0 : r0 + n])
        pos = e0 + n
    parts.append(xp.zeros((*lead, lg.size - pos), m.dtype))
    return xp.concatenate(parts, axis=-1)


def kernel_reach(obs) -> int:
    """Rest pixels a broadened rest pixel reads on each side: the velocity kernel's
    static half-width plus the instrumental profile's (0 without broadening)."""
    if obs.broad is None:
        return 0
    lsf_half = 0 if obs.lsf is None else (int(obs.lsf.shape[0]) - 1) // 2
    return int(obs.broad.vel_half) + lsf_half


def complete_rest(obs) -> np.ndarray:
    """(P_rest,) bool: rest pixels whose broadening kernels stay inside their chip.

    :func:`payne_lite.observe.broadening.convolve_segments` pads a chip's ends with
    its end pixel, so the broadened flux within :func:`kernel_reach` pixels of a
    chip end (or a gap) is not the model's; those rest pixels are left out of
    :func:`shift_pair`'s validity and :func:`~payne_lite.observe.window_valid`
    (observed pixels that read them get zero weight). The reach is static: the
    widest kernel the parameters' ranges allow (vsini up to its range's top: ~30
    APOGEE pixels at each chip end when vsini is fitted)."""
    n = int(obs.x_rest.shape[0])
    k = kernel_reach(obs)
    ok = np.ones(n, bool)
    if k == 0:
        return ok
    ok[:] = False
    for a, length in obs.broad.segments:
        ok[a + k : a + length - k] = True
    return ok


#: The Doppler interpolant of the observation model (:data:`TAP_OFFSETS`).
DOPPLER_INTERP = "lanczos6"
#: Doppler interpolants: tap offsets from the rest pixel at or below the shifted
#: position. ``"cubic"``: Keys' cubic convolution (a = -1/2, four taps), whose value
#: and first derivative are continuous in the position, so chi2(rv) is smooth, and
#: which reproduces quadratics exactly; ``"cubic6"``: Keys' six-tap cubic
#: convolution (also C1, third-order accurate: closer to a band-limited shift);
#: ``"linear"``: two-point linear interpolation (kinks at every node; the MDN's
#: feature extraction, which was trained on it); ``"lanczos6"``: the Lanczos kernel
#: ``sinc(x) sinc(x / 6)``, twelve taps, the weights normalised to sum 1: a
#: band-limited shift (C1), within 1.6e-3 pixels of the truth for Gaussian lines
#: 2-5 pixels wide, where ``"cubic6"`` is off by up to 1.8e-2. The default since
#: 2026-12: a spectrum that the instrument's profile band-limits is the sinc
#: reconstruction of its samples (SDSS resamples APOGEE's visits so), and at S/N 300
#: the cubic's own shift error is twice the rv error; with the searches on the
#: cubic (:data:`SEARCH_INTERP`) it costs ~1.05x the cubic's fit time.
#: ``benchmarks/bench_doppler.py --interp cubic6`` and ``--kernels`` measure the
#: two (benchmarks/README.md).
TAP_OFFSETS = {
    "linear": (0, 1),
    "cubic": (-1, 0, 1, 2),
    "cubic6": (-2, -1, 0, 1, 2, 3),
    "lanczos6": tuple(range(-5, 7)),
}
#: The interpolant of the fit's searches where the model's own is costlier: the
#: screening of starting points and the rv polish's probe compare chi2 values only
#: among themselves, and the LM that follows uses the model's interpolant (and keeps
#: the lower chi2 of its own). Lanczos-6's twelve taps made the probe 3.6x and the
#: screening 2.4x dearer than Keys' six-tap cubic, whose shift is within 0.02 pixels
#: of it (500 APOGEE spectra, one thread, before the taps were computed at once: fit
#: 0.66 -> 0.55 s, Keys' alone 0.45 s; since then 1.02-1.05x Keys' fit time).
SEARCH_INTERP = {"lanczos6": "cubic6"}


def _kernel(kind: str, a):
    """The interpolation kernel of ``kind`` at the distance ``a`` >= 0 [pixels]."""
    if kind == "linear":
        return jnp.maximum(1.0 - a, 0.0)
    if kind == "cubic":
        return jnp.where(
            a <= 1.0,
            (1.5 * a - 2.5) * a * a + 1.0,
            jnp.where(a < 2.0, ((-0.5 * a + 2.5) * a - 4.0) * a + 2.0, 0.0),
        )
    if kind == "cubic6":
        return jnp.where(
            a <= 1.0,
            (4.0 / 3.0 * a - 7.0 / 3.0) * a * a + 1.0,
            jnp.where(
                a <= 2.0,
                ((-7.0 / 12.0 * a + 3.0) * a - 59.0 / 12.0) * a + 2.5,
                jnp.where(a < 3.0, ((a / 12.0 - 2.0 / 3.0) * a + 1.75) * a - 1.5, 0.0),
            ),
        )
    if kind == "lanczos6":  # unnormalised (tap_weights normalises)
        return jnp.where(a < 6.0, jnp.sinc(a) * jnp.sinc(a / 6.0), 0.0)
    raise ValueError(f"unknown Doppler interpolant {kind!r}")


def tap_weights(kind: str, t):
    """Weights of the taps :data:`TAP_OFFSETS` ``[kind]`` at the fraction ``t`` in
    [0, 1] of the interval, and their derivatives by ``t``: two tuples of arrays
    shaped like ``t``. The weights sum to 1 for any ``t``; at ``t == 0`` and
    ``t == 1`` (a node) they are exactly 1 for offset 0 (1) and 0 for the others
    (a Lanczos kernel's are normalised by their sum, with the quotient's derivative).
    A tap at offset o <= 0 lies t - o to the left, one at o >= 1 lies o - t to the
    right (so that the linear interpolant's derivative at a node is the right-hand
    segment's)."""
    if kind not in TAP_OFFSETS:
        raise ValueError(f"unknown Doppler interpolant {kind!r}")
    one = jnp.ones_like(t)
    if kind == "linear":
        return (1.0 - t, t), (-one, one)
    # every tap at once, stacked on a leading axis: one operation per step for all
    # the taps (a loop over twelve Lanczos taps wrote ~25 operations per tap into
    # every program that shifts, and doubled the LM's compile time)
    t = jnp.asarray(t)
    offs = np.asarray(TAP_OFFSETS[kind], t.dtype).reshape((-1,) + (1,) * t.ndim)
    sign = np.where(offs <= 0, 1, -1).astype(t.dtype)
    w, dw = jax.jvp(lambda x: _kernel(kind, sign * (x[None] - offs)), (t,), (one,))
    # on a node the weights are exactly one-hot (a tap off the grid gets 0, not a
    # rounding residue), with the kernel's derivative kept (stop_gradient of the
    # correction: jax.grad at a node is the kernel's, not 0)
    at0 = w + jax.lax.stop_gradient((offs == 0).astype(w.dtype) - w)
    at1 = w + jax.lax.stop_gradient((offs == 1).astype(w.dtype) - w)
    w = jnp.where(t == 0, at0, jnp.where(t == 1, at1, w))
    if kind == "lanczos6":  # normalised to sum 1 (one-hot at a node already)
        tot, dtot = jnp.sum(w, axis=0), jnp.sum(dw, axis=0)
        dw = (dw * tot - w * dtot) / (tot * tot)
        w = w / tot
    return tuple(w), tuple(dw)


def taps_inside(lg: LogGrid, kind: str, k):
    """True where every tap of a shift by ``k`` whole pixels lies in the embedded
    array of ``lg`` (its margin ``pad`` either side of the pixels)."""
    off = TAP_OFFSETS[kind]
    return (k + off[0] >= -lg.pad) & (k + off[-1] <= lg.pad)


def combine(rows, weights):
    """``sum_k weights[k] * rows[k]`` (taps of :class:`Shifted`)."""
    out = weights[0] * rows[0]
    for w, r in zip(weights[1:], rows[1:], strict=True):
        out = out + w * r
    return out


class Shifted(NamedTuple):
    """Rest-frame rows at the shifted positions, as taps and weights.

    ``taps``: one (c, P_obs) array per tap offset; ``w`` and ``dw_drv``: per tap, the
    weight and its derivative by rv [1/(km/s)], scalars on a :class:`LogGrid`
    (every pixel at the same fraction of its interval) else (P_obs,); ``valid``
    (P_obs,) bool.
    """

    taps: tuple
    w: tuple
    dw_drv: tuple
    valid: object

    def value(self):
        """(c, P_obs): the interpolated rows."""
        return combine(self.taps, self.w)

    def slope(self):
        """(c, P_obs): their derivative by rv [1/(km/s)]."""
        return combine(self.taps, self.dw_drv)


def log_position(lg: LogGrid, rv):
    """``(k, t, dt_drv)``: rest position = observed position - ``u`` pixels with
    ``u = k + t`` (k integer, t in [0, 1)), and ``dt/drv`` [1/(km/s)]."""
    dv = 1.0 / (C_KMS * (1.0 - (rv / C_KMS) ** 2))  # d atanh(v/c) / dv
    u = -jnp.arctanh(rv / C_KMS) * lg.inv_step
    k = jnp.floor(u)
    return k.astype(jnp.int32), u - k, -lg.inv_step * dv


def tap_span(kind: str) -> tuple[int, int]:
    """First and last tap offset of the interpolant ``kind``."""
    off = TAP_OFFSETS[kind]
    return off[0], off[-1]


def shift_pair(obs, m, rv) -> Shifted:
    """Interpolation of rest-frame rows ``m`` (c, P_rest) at lambda_obs / f.

    ``obs`` is an :class:`~payne_lite.observe.ObsModel` (its ``interp``,
    ``log_grid``, ``x_rest``, ``x_obs``, ``wave_obs``, ``lookup`` and ``gap_cum``
    are read). The interpolant is ``obs.interp`` (:data:`TAP_OFFSETS`): on a
    :class:`LogGrid` in ln lambda (every pixel at the same fraction of its
    interval), else in the pixel index of the rest grid with the fraction taken
    linearly in lambda within the interval.

    Returns a :class:`Shifted`: the taps (c, P_obs) and their weights; the validity
    (P_obs,) is False where a tap falls off the rest grid or across one of its
    gaps, or reads a rest pixel whose broadening kernel leaves its chip
    (:func:`complete_rest`).
    """
    lg = obs.log_grid
    offsets = TAP_OFFSETS[obs.interp]
    if lg is not None:
        k, t, dt_drv = log_position(lg, rv)
        w, dw = tap_weights(obs.interp, t)
        emb = embed(lg, m)  # (c, size): contiguous rows
        ok = jnp.asarray(embed(lg, complete_rest(obs)))
        taps = [[] for _ in offsets]
        va = []
        for _, e0, n in lg.obs:
            # one dynamic slice per tap, not one of n + 3 sliced again: XLA:CPU
            # vectorises a dynamic slice consumed directly, not a slice of one
            # (3.5x per row)
            v = None
            for j, o in enumerate(offsets):
                taps[j].append(jax.lax.dynamic_slice_in_dim(emb, e0 + k + o, n, axis=1))
                okj = jax.lax.dynamic_slice_in_dim(ok, e0 + k + o, n)
                if o != 0:  # at a node only tap 0 has weight
                    okj = okj | (t == 0)
                v = okj if v is None else v & okj
            va.append(v)
        valid = jnp.concatenate(va) & taps_inside(lg, obs.interp, k)
        taps = tuple(jnp.concatenate(tj, axis=1) for tj in taps)
        return Shifted(taps, w, tuple(d * dt_drv for d in dw), valid)
    inv_m1 = inv_factor_m1(rv)
    xq = obs.x_obs + obs.wave_obs * inv_m1
    n = obs.x_rest.shape[0]
    if obs.lookup is None:
        i = interval(obs.x_rest, xq)
    else:
        i = interval_lookup(obs.x_rest, obs.lookup, xq)
    xa, xb = obs.x_rest[i], obs.x_rest[i + 1]
    h = xb - xa
    t = jnp.clip((xq - xa) / h, 0.0, 1.0)
    inside = (xq >= obs.x_rest[0]) & (xq <= obs.x_rest[-1])
    # d xq / dv = lambda_obs d(1/f)/dv with d(1/f)/dv = -(1/f) d atanh(v/c)/dv: the
    # slope of the segment [x_i, x_i+1) holding xq (on a node: the segment to its
    # right); zero where the interpolation is clamped off the grid's ends.
    dv = 1.0 / (C_KMS * (1.0 - (rv / C_KMS) ** 2))
    dt_drv = jnp.where(inside, -(inv_m1 + 1.0) * dv * obs.wave_obs / h, 0.0)
    # on a rest pixel (t 0 or 1): only that pixel's tap has weight
    node = (t == 0) | (t == 1)
    at = i + (t == 1)
    lo = jnp.where(node, at, i + offsets[0])
    hi = jnp.where(node, at, i + offsets[-1])
    inside = inside & (lo >= 0) & (hi <= n - 1)
    lo_c, hi_c = jnp.clip(lo, 0, n - 1), jnp.clip(hi, 0, n - 1)
    valid = inside & (obs.gap_cum[hi_c] - obs.gap_cum[lo_c] == 0)
    complete = complete_rest(obs)
    idx = [jnp.clip(i + o, 0, n - 1) for o in offsets]
    if not complete.all():
        c = jnp.asarray(complete)
        for ij in idx:
            valid = valid & (c[ij] | (node & (ij != at)))
    w, dw = tap_weights(obs.interp, t)
    taps = tuple(m[:, ij] for ij in idx)
    return Shifted(taps, w, tuple(d * dt_drv for d in dw), valid)


def doppler_shift(wave_rest, flux_rest, rv, wave_obs):
    """Doppler-shift a rest-frame spectrum onto an observed wavelength grid.

    ``flux_obs(lambda) = flux_rest(lambda / f)``, ``f = sqrt((1 + v/c) / (1 - v/c))``,
    by linear interpolation (``jnp.interp``). Pure JAX, one star (vmap over ``rv``).

    Args:
        wave_rest: (P_rest,) strictly increasing rest wavelength [A].
        flux_rest: (P_rest,) rest-frame flux.
        rv: scalar radial velocity [km/s], positive = redshift.
        wave_obs: (P_obs,) observed wavelength [A].

    Returns:
        ``(flux, valid)``: (P_obs,) shifted flux, and (P_obs,) bool, False where
        ``lambda / f`` falls outside the rest grid or inside one of its gaps (a step
        more than ``GAP_FACTOR`` times the median step in ln lambda).

    Note:
        Precision follows the dtype of the wavelengths given; :func:`make_model`
        precomputes float64 offsets so that float32 suffices there.
    """
    wave_rest = jnp.asarray(wave_rest)
    wave_obs = jnp.asarray(wave_obs)
    ref = wave_rest[0]
    dln = jnp.diff(jnp.log(wave_rest))
    gap = dln > GAP_FACTOR * jnp.median(dln)
    gap_cum = jnp.concatenate(
        [jnp.zeros(1, jnp.int32), jnp.cumsum(gap, dtype=jnp.int32)]
    )
    return shift(
        wave_rest - ref, gap_cum, jnp.asarray(flux_rest), wave_obs - ref, wave_obs, rv
    )
