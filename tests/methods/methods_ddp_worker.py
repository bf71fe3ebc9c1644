"""Worker side of test_gather_ddp.py, kept free of pytest so spawned processes import little.

Two gloo ranks run DDP + gathered NT-Xent (correct gather, then one whose backward divides by the
world size) and one MoCo forward; then SimSiam, Barlow Twins, VICReg, DINO and SwAV (with local
crops) and MAE (ViT) under DDP, Barlow Twins, VICReg and SwAV once more without gathering; and save
what they saw for the test to compare.
"""

from __future__ import annotations

import functools
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

import methods.barlow_twins
import methods.dist
import methods.mae
import methods.swav
import methods.vicreg
from methods import METHODS, MoCo, SimCLR, build_encoder, prepare_for_distributed
from methods.batchnorm import GlobalBatchNorm, convert_to_global_bn

WORLD = 2
N = 8  # global batch; 4 per rank
SIZE = 16  # smallest input the ConvNet takes


LOCAL = 2  # DINO's local crops per image
LOCAL_SIZE = 8
# Paper structure at test width (double precision, ConvNet with BatchNorm everywhere).
NEW_METHODS = {
    "simsiam": {"hidden_dim": 32, "projection_dim": 16, "predictor_hidden_dim": 8},
    "barlow_twins": {"hidden_dim": 32, "projection_dim": 16},
    "vicreg": {"hidden_dim": 32, "projection_dim": 16},
    "dino": {"hidden_dim": 32, "bottleneck_dim": 8, "projection_dim": 24},
    "swav": {"hidden_dim": 32, "projection_dim": 16, "num_prototypes": 12},
    "mae": {"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2},
}
MULTI_CROP = ("dino", "swav")
TINY_VIT = {"patch_size": 4, "depth": 1, "embed_dim": 16, "num_heads": 2}  # MAE's encoder: a ViT
UNGATHERED = {"barlow_twins": (methods.barlow_twins, "barlow_twins_loss"),
              "vicreg": (methods.vicreg, "vicreg_loss"), "swav": (methods.swav, "swav_loss")}


def _port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    x1 = torch.randn(N, 3, SIZE, SIZE, generator=g, dtype=torch.float64)
    return x1, x1 + 0.3 * torch.randn(N, 3, SIZE, SIZE, generator=g, dtype=torch.float64)


def _local_views() -> torch.Tensor:
    g = torch.Generator().manual_seed(321)
    return torch.randn(LOCAL, N, 3, LOCAL_SIZE, LOCAL_SIZE, generator=g, dtype=torch.float64)


def new_method(name: str) -> nn.Module:
    torch.manual_seed(0)
    encoder = build_encoder("vit_tiny", **TINY_VIT) if name == "mae" else build_encoder("convnet")
    return METHODS[name](encoder, **NEW_METHODS[name]).double()


def method_inputs(name: str, rows: slice = slice(None)) -> tuple[torch.Tensor, ...]:
    """The views `name` takes, restricted to `rows` of the global batch (DINO, SwAV: plus local crops)."""
    x1, x2 = _data()
    extra = (_local_views()[:, rows],) if name in MULTI_CROP else ()
    return (x1[rows], x2[rows], *extra)


def global_masking(rows: slice = slice(None)) -> Any:
    """MAE's `random_masking` with the masks one process draws for the whole batch [x1; x2], of which
    this rank takes the rows of its views: the same masks with and without DDP."""
    original = methods.mae.random_masking

    def masking(n: int, length: int, mask_ratio: float, device: torch.device) -> Any:
        noise = torch.rand(2 * N, length, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        mine = torch.arange(2 * N).view(2, N)[:, rows].flatten()  # this rank's x1 rows, then its x2 rows
        return original(n, length, mask_ratio, device, noise=noise[mine])

    return masking


def _new_method_grads(name: str, rows: slice) -> dict[str, Any]:
    model = prepare_for_distributed(new_method(name))
    assert any(isinstance(m, GlobalBatchNorm) for m in model.modules()) == (name != "mae")  # MAE: no BN
    ddp = nn.parallel.DistributedDataParallel(model)
    original = methods.mae.random_masking
    methods.mae.random_masking = global_masking(rows)  # type: ignore[assignment]
    try:
        loss = ddp(*method_inputs(name, rows))["loss"]
    finally:
        methods.mae.random_masking = original  # type: ignore[assignment]
    loss.backward()
    out = {"loss": loss.item(), "grads": {k: p.grad.clone() for k, p in model.named_parameters()
                                          if p.grad is not None}}
    if name == "dino":
        out["center"] = model.center.clone()
    return out


def _simclr() -> SimCLR:
    torch.manual_seed(0)
    return SimCLR(build_encoder("convnet"), hidden_dim=32, projection_dim=16).double()


class _FlatLinear(nn.Module):
    """BN-free encoder, so the keys can be recomputed outside the process group."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * SIZE * SIZE, 12)
        self.output_dim = 12

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def _moco() -> MoCo:
    torch.manual_seed(0)
    return MoCo(_FlatLinear(), hidden_dim=16, projection_dim=8, queue_size=20).double()


class _GatherDividedByWorld(torch.autograd.Function):
    """lightly's bug (#1528): the gathered gradient shrunk by the world size."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = [torch.empty_like(x) for _ in range(tdist.get_world_size())]
        tdist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        tdist.all_reduce(grad)
        grad = grad / tdist.get_world_size()
        return grad.chunk(tdist.get_world_size())[tdist.get_rank()]


def _ddp_grads(x1: torch.Tensor, x2: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    model = prepare_for_distributed(_simclr())
    assert any(isinstance(m, GlobalBatchNorm) for m in model.modules())
    ddp = nn.parallel.DistributedDataParallel(model)
    loss = ddp(x1, x2)["loss"]
    loss.backward()
    return loss.item(), {k: p.grad.clone() for k, p in model.named_parameters()}


def _bn_data() -> torch.Tensor:
    """bfloat16 activations far from zero: a bfloat16 mean of ~100 is off by up to 0.25, which a
    float32 statistic is not."""
    g = torch.Generator().manual_seed(7)
    return (100 + 2 * torch.randn(N, 3, 4, 4, generator=g)).to(torch.bfloat16)


def _global_bn_under_autocast(x: torch.Tensor) -> dict[str, Any]:
    """One `GlobalBatchNorm` training step on this rank's bfloat16 slice, inside CPU autocast."""
    bn = convert_to_global_bn(nn.BatchNorm2d(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bn(x)
    return {"bn_dtype": str(y.dtype), "bn_out": y.float(), "bn_running_mean": bn.running_mean.clone(),
            "bn_running_var": bn.running_var.clone()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                             world_size=WORLD)
    try:
        x1, x2 = _data()
        mine = slice(rank * N // WORLD, (rank + 1) * N // WORLD)
        result: dict[str, Any] = {}
        result["loss"], result["grads"] = _ddp_grads(x1[mine], x2[mine])
        original = methods.dist._GatherWithGrad
        methods.dist._GatherWithGrad = _GatherDividedByWorld  # type: ignore[misc]
        try:
            _, result["grads_divided"] = _ddp_grads(x1[mine], x2[mine])
        finally:
            methods.dist._GatherWithGrad = original  # type: ignore[misc]

        for name in NEW_METHODS:
            result[name] = _new_method_grads(name, mine)
        for name, (module, fn) in UNGATHERED.items():
            original_loss = getattr(module, fn)
            setattr(module, fn, functools.partial(original_loss, gather=False))
            try:
                result[f"{name}_ungathered"] = _new_method_grads(name, mine)
            finally:
                setattr(module, fn, original_loss)

        moco = _moco()
        queue_before = moco.queue.clone()
        moco(x1[mine], x2[mine])
        result["queue_before"], result["queue"] = queue_before, moco.queue.clone()
        result["ptr"] = int(moco.queue_ptr)
        result.update(_global_bn_under_autocast(_bn_data()[mine]))
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        tdist.destroy_process_group()
