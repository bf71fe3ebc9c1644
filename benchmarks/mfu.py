"""Model FLOPs utilisation (MFU): the FLOPs a training step needs, over its time, against the chip's peak.

FLOPs are counted, not estimated: `torch.utils.flop_counter.FlopCounterMode` over one forward and
backward of the method (matmuls and convolutions; the elementwise ops are not counted, as in
PaLM's MFU definition). The peak is the chip's dense bf16 tensor-core figure from its data sheet
(no sparsity), the precision the GPU step runs in (bf16 autocast).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Dense bf16 tensor-core peak, TFLOP/s (NVIDIA data sheets, SXM parts unless named; no 2:4 sparsity).
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H200": 989.4,
    "H100 PCIe": 756.0,
    "H100": 989.4,
    "A100": 312.0,
    "L40S": 362.05,
    "L4": 121.0,
    "A10G": 70.0,  # AWS's A10G: 70 dense bf16 per NVIDIA's A10G sheet
    "RTX A6000": 154.8,
}


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its `torch.cuda.get_device_name()`; None when unknown or a CPU."""
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key.lower() in device_name.lower():
            return PEAK_BF16_TFLOPS[key]
    return None


def step_flops(step: Callable[[], torch.Tensor]) -> int:
    """FLOPs of one call of `step` (a forward that returns the loss; its backward is counted too)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step().backward()
    return int(counter.get_total_flops())


def mfu(flops_per_step: float, seconds_per_step: float, device_name: str) -> float | None:
    """Achieved FLOP/s over the peak (a fraction), or None when the peak is unknown."""
    peak = peak_tflops(device_name)
    if peak is None or seconds_per_step <= 0:
        return None
    return flops_per_step / seconds_per_step / (peak * 1e12)
