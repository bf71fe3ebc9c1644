"""Projection and prediction heads of SimCLR, MoCo v2 and BYOL (pattern: lightly `models/modules/heads.py`)."""

from __future__ import annotations

from torch import nn


def simclr_projector(input_dim: int, hidden_dim: int, output_dim: int = 128) -> nn.Sequential:
    """SimCLR's g(h) = W2 relu(W1 h) (Chen et al. 2020, sec. 2.1), 128-d output.

    Departure from the equation, following the reference implementation (SimCLR `model_util.py`,
    `num_proj_layers=2`, `use_bn=True`) and lightly: the hidden layer has BatchNorm and no bias.
    """
    return nn.Sequential(
        nn.Linear(input_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, output_dim),
    )


def moco_projector(input_dim: int, hidden_dim: int = 2048, output_dim: int = 128) -> nn.Sequential:
    """MoCo v2's MLP head (Chen et al. 2020, "Improved Baselines"): fc-ReLU-fc, no BatchNorm."""
    return nn.Sequential(
        nn.Linear(input_dim, hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, output_dim),
    )


def byol_mlp(input_dim: int, hidden_dim: int = 4096, output_dim: int = 256) -> nn.Sequential:
    """BYOL's projector and predictor (Grill et al. 2020, sec. 3.3): linear 4096, BN, ReLU, linear 256."""
    return nn.Sequential(
        nn.Linear(input_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, output_dim),
    )


def byol_projector(input_dim: int, hidden_dim: int = 4096, output_dim: int = 256) -> nn.Sequential:
    """BYOL's projector g: encoder features -> 256-d projection."""
    return byol_mlp(input_dim, hidden_dim, output_dim)


def byol_predictor(dim: int = 256, hidden_dim: int = 4096) -> nn.Sequential:
    """BYOL's predictor q (online network only): same architecture as the projector, 256 -> 256."""
    return byol_mlp(dim, hidden_dim, dim)
