"""Projection and prediction heads of every method (pattern: lightly `models/modules/heads.py`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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


def simsiam_projector(input_dim: int, hidden_dim: int = 2048, output_dim: int = 2048) -> nn.Sequential:
    """SimSiam's projector (Chen & He 2021, sec. 4.1 and the reference `builder.py`): 3 layers,
    BN on every output (the last one without affine parameters), ReLU on the hidden ones.

    Departure: the paper's CIFAR experiments use a 2-layer projector; this is the ImageNet one.
    """
    return nn.Sequential(
        nn.Linear(input_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, output_dim, bias=False),  # no bias: the BN after it removes it
        nn.BatchNorm1d(output_dim, affine=False),
    )


def simsiam_predictor(dim: int = 2048, hidden_dim: int = 512) -> nn.Sequential:
    """SimSiam's predictor h: a 2048-512-2048 bottleneck, BN + ReLU on the hidden layer only."""
    return nn.Sequential(
        nn.Linear(dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, dim),
    )


def three_layer_projector(input_dim: int, hidden_dim: int, output_dim: int, *,
                          hidden_bias: bool) -> nn.Sequential:
    """Barlow Twins' projector and VICReg's expander: (linear, BN, ReLU) x 2, then a linear layer
    without bias (Zbontar et al. 2021, sec. 3; Bardes et al. 2022, sec. 4.2: 8192 units each).

    Args:
        hidden_bias: bias on the two hidden linear layers (VICReg's reference code: yes; Barlow
            Twins': no). The output layer has none in either.
    """
    return nn.Sequential(
        nn.Linear(input_dim, hidden_dim, bias=hidden_bias),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, hidden_dim, bias=hidden_bias),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, output_dim, bias=False),
    )


class DINOHead(nn.Module):
    """DINO's head (Caron et al. 2021, sec. 3.1 and app.; reference `vision_transformer.py`):
    a 3-layer MLP (GELU, hidden 2048) to a 256-d bottleneck, L2-normalised, then a weight-normalised
    linear layer to K prototype scores whose norms are fixed to 1 (`norm_last_layer=True`).

    The last layer is written as x @ normalize(V)^T: the reference's `weight_norm` with its `g`
    frozen at 1 computes exactly that, and a plain parameter survives deepcopy, EMA and checkpoints
    without a parametrisation. No BN in the MLP (the reference's default `use_bn=False`).
    """

    def __init__(self, input_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 output_dim: int = 65536) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(input_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):  # the reference's trunc_normal_(std=.02), zero bias
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.prototypes = nn.Parameter(torch.empty(output_dim, bottleneck_dim))  # V: [K, bottleneck]
        nn.init.kaiming_uniform_(self.prototypes, a=5 ** 0.5)  # nn.Linear's default, as the reference

    def forward(self, x: Tensor) -> Tensor:
        z = F.normalize(self.mlp(x), dim=-1)  # [B, bottleneck]
        return z @ F.normalize(self.prototypes, dim=-1).T  # [B, K]
