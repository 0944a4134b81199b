"""Keeping XLA from fusing an array's computation into each of its consumers.

XLA fuses elementwise producers into their consumers: an array read by several
dynamic slices (the taps of the Doppler interpolation, :mod:`payne_lite.observe`)
is then recomputed once per slice. ``jax.lax.optimization_barrier`` does not stop
that on XLA:CPU (jaxlib 0.10: the barrier is expanded away before fusion; the dumped
optimised HLO of the fitter's normal equations has no barrier left, and the
network's output layer sits inside the shift's fusion, evaluated once per slice). An
operand of a conditional, on the other hand, is a buffer: :func:`materialize` passes
the array through a ``lax.cond`` on a predicate known only at run time.

Measured on the APOGEE network (one LM step's normal equations, 64 stars through
``lax.map``, 2 cores): 158 -> 129 us per star with the two-tap linear shift, 285 ->
150 us with the six-tap cubic one.

Under ``jax.vmap`` with a batched predicate the conditional becomes a ``select``
and the array may be fused again: the result is the same, only the saving is lost.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def materialize(x, ok):
    """``x`` itself, computed once into a buffer: the identity through a
    conditional on the run-time scalar ``ok``. Where ``ok`` is False the result is
    NaN, so pass a predicate that holds for every input whose result is used (for
    example a finite rv: with a NaN rv the model is NaN anyway)."""
    return jax.lax.cond(ok, lambda y: y, lambda y: jnp.full_like(y, jnp.nan), x)


def computed(fn, ok, *operands):
    """``fn(*operands)`` computed once into a buffer, as :func:`materialize` makes
    it, but inside the conditional's branch, which writes it straight into the
    result: :func:`materialize` of a computed array passes it through the branch,
    and XLA copies it there (measured: the rows of the fitter's normal equations,
    263 kB an evaluation). NaN (of ``fn``'s result's shape and dtype) where ``ok``
    is False."""

    def nan(*args):
        out = jax.eval_shape(fn, *args)
        return jnp.full(out.shape, jnp.nan, out.dtype)

    return jax.lax.cond(ok, fn, nan, *operands)
