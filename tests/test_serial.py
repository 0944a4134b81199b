"""payne_lite._serial: CPU executables compiled without intra-op task splitting."""

from __future__ import annotations

import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from payne_lite._serial import one_cpu, serial_jit

needs_two_cpus = pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs sched_setaffinity and at least 2 CPUs",
)


def _masks():
    out = {}
    for t in os.listdir("/proc/self/task"):
        try:
            out[int(t)] = os.sched_getaffinity(int(t))
        except OSError:
            pass
    return out


@jax.jit
def _big(x):
    # a large elementwise loop: XLA:CPU splits it into tasks when it may
    return jnp.tanh(x) * 2.0 + jnp.sin(x)


@needs_two_cpus
def test_serial_jit_compiles_without_task_splitting_and_restores_affinity():
    x = jnp.linspace(-3.0, 3.0, 1 << 20)
    before = _masks()
    # (another shape: JAX caches executables by their lowered module)
    plain = _big.lower(jnp.linspace(-3.0, 3.0, (1 << 20) + 8)).compile().as_text()
    assert 'outer_dimension_partitions":["' in plain  # the split we avoid
    f = serial_jit(_big)
    y = f(x)
    (compiled,) = f._cache.values()
    assert 'outer_dimension_partitions":["' not in compiled.as_text()
    np.testing.assert_array_equal(np.asarray(y), np.asarray(_big(x)))
    assert f(x + 1.0) is not None and len(f._cache) == 1  # same signature: reused
    f(x[:1000])
    assert len(f._cache) == 2  # a new shape: compiled again
    after = _masks()
    assert all(after[t] == m for t, m in before.items() if t in after)
    assert all(m == os.sched_getaffinity(0) for m in after.values())
    f.clear()
    assert not f._cache


@needs_two_cpus
def test_one_cpu_pins_every_thread_and_restores():
    cpus = os.sched_getaffinity(0)
    seen = {}
    go, done = threading.Event(), threading.Event()

    def worker():
        go.wait()
        seen["inside"] = os.sched_getaffinity(0)
        done.set()

    th = threading.Thread(target=worker)
    th.start()
    with one_cpu():
        assert os.sched_getaffinity(0) == {min(cpus)}
        go.set()
        done.wait(5)
    th.join(5)
    assert seen["inside"] == {min(cpus)}
    assert os.sched_getaffinity(0) == cpus


def test_static_arguments_and_key():
    @jax.jit
    def g(x, *, n):
        return x * n

    calls = []
    f = serial_jit(jax.jit(g, static_argnames=("n",)), ("n",), key=lambda: len(calls))
    x = jnp.ones(3)
    np.testing.assert_array_equal(f(x, n=2), [2.0, 2.0, 2.0])
    np.testing.assert_array_equal(f(x, n=3), [3.0, 3.0, 3.0])
    calls.append(1)  # the key changes: a new executable, not a stale one
    np.testing.assert_array_equal(f(x, n=3), [3.0, 3.0, 3.0])
    if jax.default_backend() == "cpu":
        assert len(f._cache) == 3
