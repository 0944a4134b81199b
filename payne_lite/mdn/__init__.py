"""payne_lite.mdn: see the modules inside; public names re-exported here."""

from __future__ import annotations

from ._flow import Flow as Flow
from ._flow import FlowNet as FlowNet
from ._mdn import MDN as MDN
from ._mdn import MDN_FORMAT as MDN_FORMAT
from ._mdn import MDN_VERSION as MDN_VERSION
from ._mixture import MLP as MLP
from ._mixture import SIGMA_FLOOR as SIGMA_FLOOR
from ._mixture import Features as Features
from ._mixture import features as features
from ._mixture import mixture_moments as mixture_moments
from ._mixture import mixture_nll as mixture_nll
from ._mixture import mixture_params as mixture_params
from ._mixture import mlp_forward as mlp_forward
from ._train import MDNConfig as MDNConfig
from ._train import simulate as simulate
from ._train import train_mdn as train_mdn
from ._train_flow import FlowConfig as FlowConfig
from ._train_flow import train_flow as train_flow

__all__ = [
    "Features",
    "Flow",
    "FlowConfig",
    "FlowNet",
    "MDN",
    "MDNConfig",
    "MDN_FORMAT",
    "MDN_VERSION",
    "MLP",
    "SIGMA_FLOOR",
    "features",
    "mixture_moments",
    "mixture_nll",
    "mixture_params",
    "mlp_forward",
    "simulate",
    "train_flow",
    "train_mdn",
]
