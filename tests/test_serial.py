"""payne_lite._serial: CPU executables compiled without intra-op task splitting."""

from __future__ import annotations

import os
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from payne_lite._serial import current_cpu, memory_maps, one_cpu, serial_jit

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


def _move_to(cpu, cpus):
    """Run the calling thread on ``cpu`` (where :func:`current_cpu` must find it),
    then allow it ``cpus`` again (it stays on ``cpu`` until the scheduler moves it)."""
    os.sched_setaffinity(0, {cpu})
    time.sleep(0.005)
    assert current_cpu(cpus) == cpu
    os.sched_setaffinity(0, cpus)


@needs_two_cpus
def test_one_cpu_pins_every_thread_to_the_callers_cpu_and_restores():
    """Every thread of the process is pinned to the CPU the caller runs on, whichever
    it is (all processes pinned to the lowest CPU compiled on that one while the
    others idled), and the masks come back after."""
    cpus = os.sched_getaffinity(0)
    for cpu in sorted(cpus):
        seen = {}
        go, done = threading.Event(), threading.Event()

        def worker(seen=seen, go=go, done=done):
            go.wait()
            seen["inside"] = os.sched_getaffinity(0)
            done.set()

        th = threading.Thread(target=worker, daemon=True)
        th.start()
        for _ in range(20):  # the scheduler may move the thread before the pin
            _move_to(cpu, cpus)
            with one_cpu():
                pinned = os.sched_getaffinity(0)
                if pinned != {cpu}:
                    continue
                go.set()
                done.wait(5)
            break
        th.join(5)
        assert pinned == {cpu} and seen["inside"] == {cpu}, (cpu, pinned, seen)
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


def test_warm_compiles_without_running():
    """``warm`` compiles for the arguments' shapes and runs nothing (a callback in
    the program would see it); the call that follows compiles nothing new."""
    from payne_lite._compile import CompileCounter

    ran = []

    @jax.jit
    def g(x):
        jax.debug.callback(lambda: ran.append(1))
        return 2.0 * x

    f = serial_jit(g)
    x = jnp.ones(5)
    f.warm(x)
    assert ran == []
    if jax.default_backend() == "cpu":
        assert len(f._cache) == 1
    with CompileCounter() as c:
        np.testing.assert_array_equal(f(x), 2.0 * np.ones(5))
    assert c.compiles == 0
    assert ran == [1]


def test_memory_map_guard_clears_every_executable(monkeypatch):
    """Above the fraction of the process's memory-map limit, the guard forgets every
    serial_jit's executables (and JAX's); below it, nothing. A cache miss runs the
    guard before it compiles."""
    from payne_lite import _serial

    monkeypatch.setattr(_serial, "_quiet_below", 0)
    f = serial_jit(jax.jit(lambda x: x + 1.0))
    g = serial_jit(jax.jit(lambda x: x * 3.0))
    f(jnp.ones(4)), g(jnp.ones(5))
    monkeypatch.setattr(_serial, "memory_maps", lambda: (499, 1000))
    assert not _serial.guard_memory_maps(0.5)
    f(jnp.ones(6))  # a miss below the limit: nothing else is forgotten
    assert len(f._cache) == 2 and len(g._cache) == 1
    monkeypatch.setattr(_serial, "memory_maps", lambda: (501, 1000))
    f(jnp.ones(4))  # a hit: no guard
    assert len(g._cache) == 1
    f(jnp.ones(7))  # a miss above the limit: every cache is emptied, then it compiles
    assert len(g._cache) == 0 and list(f._cache) and len(f._cache) == 1
    np.testing.assert_array_equal(f(jnp.ones(7)), 2.0 * np.ones(7))


def test_memory_map_guard_waits_when_a_clear_does_not_help(monkeypatch):
    """Mappings that are not executables' (a clear leaves the count above the
    fraction): the guard clears once, then not again until another 5 % of the limit
    is mapped, so threads do not keep clearing each other's kernels."""
    from payne_lite import _serial

    monkeypatch.setattr(_serial, "_quiet_below", 0)
    cleared = []
    monkeypatch.setattr(_serial, "clear_caches", lambda: cleared.append(1))
    monkeypatch.setattr(_serial, "memory_maps", lambda: (600, 1000))
    assert _serial.guard_memory_maps(0.5) and len(cleared) == 1
    assert not _serial.guard_memory_maps(0.5)  # still 600: waits
    monkeypatch.setattr(_serial, "memory_maps", lambda: (649, 1000))
    assert not _serial.guard_memory_maps(0.5)
    monkeypatch.setattr(_serial, "memory_maps", lambda: (651, 1000))
    assert _serial.guard_memory_maps(0.5) and len(cleared) == 2


@pytest.mark.skipif(memory_maps() is None, reason="needs /proc/self/maps")
def test_clearing_executables_frees_their_memory_maps():
    """The premise of the guard, measured: compiled executables hold memory
    mappings (LLVM's sections), and clear_caches gives them back."""
    import gc

    from payne_lite import _serial

    # the process's first compilation maps things for good (thread stacks, pools)
    serial_jit(jax.jit(lambda x: jnp.sin(x) * 2.0))(jnp.ones(16, jnp.float32))
    _serial.clear_caches()
    gc.collect()
    before = _serial.memory_maps()[0]
    fs = [
        serial_jit(jax.jit(lambda x, k=k: jnp.tanh(x * k) + jnp.cos(x) ** k))
        for k in range(1, 17)
    ]
    for f in fs:
        f(jnp.ones(16, jnp.float32))
    held = _serial.memory_maps()[0]
    assert held - before >= 16  # at least one mapping per executable
    _serial.clear_caches()
    gc.collect()
    after = _serial.memory_maps()[0]
    assert after - before <= 0.25 * (held - before), (before, held, after)
