"""Warn at import about jaxlib builds known to compute wrong results on CPU.

jaxlib 0.10.2 silently miscompiles some float32 broadcast-multiply-reduce fusions on CPU
(offloaded to YNNPACK; jax-ml/jax#39103, #39257). The package pins around it; this
catches an environment that installed it anyway. The documented workaround is
``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-reduce`` set before JAX starts.
"""

from __future__ import annotations

import os
import warnings

import jaxlib

_BAD_JAXLIB = {"0.10.2"}
_WORKAROUND = "--xla_cpu_experimental_ynn_fusion_type=-reduce"


def _check() -> None:
    version = getattr(jaxlib, "__version__", "")
    if version in _BAD_JAXLIB and _WORKAROUND not in os.environ.get("XLA_FLAGS", ""):
        warnings.warn(
            f"jaxlib {version} miscompiles float32 reductions on CPU (jax-ml/jax#39103); "
            f"install jaxlib 0.10.1 or set XLA_FLAGS={_WORKAROUND} before importing jax",
            RuntimeWarning,
            stacklevel=3,
        )


_check()
