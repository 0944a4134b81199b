"""The windowed residual statistic of the predictive check (:mod:`._ppc`), pure JAX.

Shared by :func:`._ppc.dip_batch` (residuals of a model evaluated anew) and the LM
(:func:`._lm.lm_batch`, from the weighted residuals of its last evaluation, which it
holds anyway): no module above either imports the other.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

#: Pixels of the window of ``max_dip``.
DIP_WIDTH = 5


def window_dip(z, good):
    """The largest ``|sum z| / sqrt(m)`` over windows of ``DIP_WIDTH`` consecutive
    pixels of one spectrum, ``z`` (P,) its weighted residuals (either sign) and ``m``
    the pixels of the window where ``good`` (P,); windows with fewer than
    ``DIP_WIDTH // 2 + 1`` are skipped; 0 without any (NumPy reference:
    :func:`._ppc.max_dip`).

    A ``reduce_window`` (62 us a star with the model, where five shifted slices of a
    dynamic-sliced model took 320: XLA:CPU writes those as scalar code).
    """
    if z.shape[0] < DIP_WIDTH:
        return jnp.zeros((), z.dtype)
    z = jnp.where(good, z, 0.0)
    g = good.astype(z.dtype)
    zs, gs = (
        jax.lax.reduce_window(a, 0.0, jax.lax.add, (DIP_WIDTH,), (1,), "VALID")
        for a in (z, g)
    )
    half = DIP_WIDTH // 2 + 1
    stat = jnp.where(gs >= half, jnp.abs(zs) / jnp.sqrt(jnp.maximum(gs, 1.0)), 0.0)
    return jnp.max(stat)
