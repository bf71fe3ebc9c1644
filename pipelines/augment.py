"""Batched two-view augmentations for self-supervised pretraining (SimCLR, MoCo v2, BYOL, DINO, ...).

One call takes a uint8 batch ``[B, C, H, W]`` on any device and returns two normalised float32
views ``[B, 3, size, size]`` on the same device, and with ``local_crops=V`` also DINO's multi-crop
local views ``[V, B, 3, local_size, local_size]``. Every sample (and local crop) draws its own
parameters from one ``torch.Generator`` on that device, so the same seed gives the same views
and nothing leaves the device. The ops follow torchvision's semantics (checked against
``torchvision.transforms.v2`` in ``tests/pipelines/test_augment.py``):

    random resized crop -> horizontal flip -> colour jitter (p) -> grayscale (p) -> blur (p)
    -> solarize (p) -> normalise

Why hand-written and not kornia: ``benchmarks/pipeline_throughput.py`` times each op against
``kornia.augmentation`` 0.9 on the same decoded batch (512 CIFAR-10 images, 1 thread, 2-core
machine): crop+flip+resize as one ``grid_sample`` 4.1x kornia, colour jitter 2.0x, grayscale
3.4x, blur (one grouped separable convolution) 1.4x, solarize 5.4x, the whole SimCLR preset 2.5x;
so every op stays hand-written. On CPU call ``keep_freed_memory()`` once per process (see there).

Two backends apply the same parameters: these PyTorch ops (any device; the GPU path), and on CPU
``pipelines.augment_numba``, the same arithmetic fused per image and compiled with numba (~5x
faster there: the ~90 whole-batch passes of the PyTorch ops leave the cache on a CPU). Parameters
are always drawn here, with one generator, so seeds and distributions do not depend on the backend.

Papers:
    SimCLR: Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
        Representations", Appendix A (augmentations) and B.9 (CIFAR-10).
    MoCo v2: Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning",
        and its reference code (``main_moco.py --aug-plus``).
    BYOL: Grill et al. 2020, "Bootstrap Your Own Latent", Appendix B, Table 6.
    DINO: Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers", and its
        reference code (``main_dino.py``, ``DataAugmentationDINO``): multi-crop.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipelines.errors import DataError

# ImageNet statistics (RGB); every model input in selfsup is normalised with these.
MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale.
_GRAY = (0.2989, 0.587, 0.114)
_SOLARIZE_THRESHOLD = 0.5  # BYOL Table 6; equals torchvision's 128 on uint8 for x/255 inputs.

# Paper values. ``blur_prob`` and ``solarize_prob`` are (view1, view2): BYOL is asymmetric.
# ``jitter`` is ColorJitter's (brightness, contrast, saturation, hue) before ``jitter_strength``.
PRESETS: dict[str, dict[str, object]] = {
    # SimCLR App. A: crop (0.08, 1), ratio (3/4, 4/3), flip, jitter 0.8*s for b/c/s and 0.2*s for
    # hue with p=0.8, grayscale p=0.2, blur p=0.5 with sigma (0.1, 2) and a kernel of 10% of the side.
    # s=1 for ImageNet; App. B.9 uses s=0.5 and no blur on CIFAR-10 (see the CIFAR convention below).
    "simclr": dict(
        crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), flip_prob=0.5,
        jitter=(0.8, 0.8, 0.8, 0.2), jitter_prob=0.8, grayscale_prob=0.2,
        blur_prob=(0.5, 0.5), blur_sigma=(0.1, 2.0), solarize_prob=(0.0, 0.0),
    ),
    # MoCo v2 (--aug-plus): crop (0.2, 1), jitter (0.4, 0.4, 0.4, 0.1) p=0.8, grayscale 0.2,
    # blur p=0.5 sigma (0.1, 2), flip. Note: the reference code blurs with PIL's GaussianBlur(radius=sigma)
    # over the whole image; we use SimCLR's 10%-of-side kernel for every preset.
    "moco_v2": dict(
        crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3), flip_prob=0.5,
        jitter=(0.4, 0.4, 0.4, 0.1), jitter_prob=0.8, grayscale_prob=0.2,
        blur_prob=(0.5, 0.5), blur_sigma=(0.1, 2.0), solarize_prob=(0.0, 0.0),
    ),
    # BYOL Table 6: crop (0.08, 1), flip, jitter (0.4, 0.4, 0.2, 0.1) p=0.8, grayscale 0.2,
    # blur p=1.0 / 0.1 and solarize p=0.0 / 0.2 for view 1 / view 2.
    "byol": dict(
        crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), flip_prob=0.5,
        jitter=(0.4, 0.4, 0.2, 0.1), jitter_prob=0.8, grayscale_prob=0.2,
        blur_prob=(1.0, 0.1), blur_sigma=(0.1, 2.0), solarize_prob=(0.0, 0.2),
    ),
    # DINO's global crops (main_dino.py defaults): BYOL's colour ops and asymmetric blur/solarize,
    # crops of (0.4, 1) since the local crops cover the small scales. (Its ResNet-50 recipe uses
    # 0.14 instead of 0.4.)
    "dino": dict(
        crop_scale=(0.4, 1.0), crop_ratio=(3 / 4, 4 / 3), flip_prob=0.5,
        jitter=(0.4, 0.4, 0.2, 0.1), jitter_prob=0.8, grayscale_prob=0.2,
        blur_prob=(1.0, 0.1), blur_sigma=(0.1, 2.0), solarize_prob=(0.0, 0.2),
    ),
    # MAE (main_pretrain.py): RandomResizedCrop (0.2, 1) and a horizontal flip, nothing else.
    "mae": dict(
        crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3), flip_prob=0.5,
        jitter=(0.0, 0.0, 0.0, 0.0), jitter_prob=0.0, grayscale_prob=0.0,
        blur_prob=(0.0, 0.0), blur_sigma=(0.1, 2.0), solarize_prob=(0.0, 0.0),
    ),
}
# DINO's local crops (main_dino.py): scale (0.05, 0.4), blur p=0.5, no solarize, the rest as the
# preset's first view. Any preset takes local crops; only the DINO method consumes them.
LOCAL_CROP_SCALE: tuple[float, float] = (0.05, 0.4)
LOCAL_BLUR_PROB = 0.5
LOCAL_SOLARIZE_PROB = 0.0
BACKENDS = ("auto", "numba", "torch")
OVERRIDES = (
    "crop_scale", "crop_ratio", "flip_prob", "jitter", "jitter_strength", "jitter_prob",
    "grayscale_prob", "blur", "blur_prob", "blur_sigma", "blur_kernel_size", "solarize_prob",
)


@dataclass(frozen=True)
class ViewConfig:
    """The resolved augmentation settings of one view."""

    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    flip_prob: float
    jitter: tuple[float, float, float, float]  # brightness, contrast, saturation, hue strengths
    jitter_prob: float
    grayscale_prob: float
    blur_prob: float
    blur_sigma: tuple[float, float]
    blur_kernel_size: int
    solarize_prob: float


@dataclass
class ViewParams:
    """The random parameters one view drew, one row per sample (returned for tests and debugging)."""

    crop: Tensor        # [n, 4] int64: top i, left j, height h, width w (torchvision's get_params order)
    flip: Tensor        # [n] bool
    jitter: Tensor      # [n] bool: colour jitter applied
    factors: Tensor     # [n, 4] float: brightness, contrast, saturation factors and hue shift
    order: Tensor       # [n, 4] int64: op indices (0 b, 1 c, 2 s, 3 h) in the order applied
    grayscale: Tensor   # [n] bool
    blur: Tensor        # [n] bool
    blur_sigma: Tensor  # [n] float
    solarize: Tensor    # [n] bool


def normalize(images_uint8: Tensor) -> Tensor:
    """uint8 ``[B, 3, H, W]`` -> float32 scaled to [0, 1] and normalised with ``MEAN``/``STD``."""
    return _normalize_unit(images_uint8.to(torch.float32).mul_(1 / 255))


def _normalize_unit(x: Tensor) -> Tensor:
    mean = _constant(MEAN, x.dtype, x.device).view(1, 3, 1, 1)
    std = _constant(STD, x.dtype, x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


_CONSTANTS: dict[tuple[tuple[float, ...], torch.dtype, str], Tensor] = {}


def _constant(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small constant tensor, made once per (values, dtype, device): ``torch.tensor(..., device=cuda)``
    copies from pageable host memory and waits for it, so the per-batch path must not build one."""
    key = (values, dtype, str(device))
    t = _CONSTANTS.get(key)
    if t is None:
        t = _CONSTANTS[key] = torch.tensor(values, dtype=dtype, device=device)
    return t


def keep_freed_memory(limit_bytes: int = 32 << 20) -> bool:
    """Tell glibc's malloc to keep freed memory for reuse instead of handing it back to the OS.

    The CPU path allocates a few dozen ~1 MB tensors per batch; with glibc's defaults they are
    mmapped / trimmed and every reuse pays page faults, which measured 2-3x slower on the colour
    ops here (the same effect as PyTorch's advice to run CPU jobs with jemalloc/tcmalloc). This
    sets ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` to ``limit_bytes`` for the whole process
    (the env vars ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` do the same at start-up).
    Call it once in a CPU worker process; processes forked later inherit it.

    Returns:
        True when glibc accepted both settings (False on other C libraries: nothing changed).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, limit_bytes)) and bool(mallopt(m_trim_threshold, 2 * limit_bytes))


def local_crop_size(size: int) -> int:
    """DINO's local crop side for global views of ``size``: its 96/224 ratio (14 at 32, 12 at 28)."""
    return max(1, round(size * 96 / 224))


def blur_kernel_size(size: int) -> int:
    """SimCLR's blur kernel: 10% of the image side, made odd (23 at 224, 3 at 32), as its TF code."""
    return 2 * ((size // 10) // 2) + 1


# --------------------------------------------------------------------------------------------
# Parameter sampling
# --------------------------------------------------------------------------------------------

def _rand(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.rand(shape, generator=generator, device=device)


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator, device: torch.device) -> Tensor:
    return lo + (hi - lo) * _rand((n,), generator, device)


def sample_crop_params(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Per-sample crop boxes with ``torchvision.transforms.RandomResizedCrop.get_params`` semantics.

    Ten attempts per sample (area uniform in ``scale``, log aspect ratio uniform in ``log(ratio)``);
    the first box that fits is kept and placed uniformly; when none fits, torchvision's central
    fallback crop. Vectorised over samples and attempts: no host round-trip on CUDA.

    Returns:
        ``[n, 4]`` int64 tensor of (top, left, height, width).
    """
    device = torch.device(device)
    area = height * width
    target = area * (scale[0] + (scale[1] - scale[0]) * _rand((n, 10), generator, device))
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * _rand((n, 10), generator, device))
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # index of the first fitting attempt
    found = fits.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)

    # torchvision's fallback: the central crop with the aspect ratio clamped into `ratio`.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fw, fh = round(height * max(ratio)), height
    else:
        fw, fh = width, height
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))
    u = _rand((n, 2), generator, device)
    top = torch.minimum(torch.floor(u[:, 0] * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(u[:, 1] * (width - w + 1)), width - w)
    top = torch.where(found, top, torch.div(height - h, 2, rounding_mode="floor"))
    left = torch.where(found, left, torch.div(width - w, 2, rounding_mode="floor"))
    return torch.stack([top, left, h, w], dim=1).to(torch.int64)


def sample_crop_boxes(
    heights: Tensor,
    widths: Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> Tensor:
    """``sample_crop_params`` for images of different sizes: image k's box is drawn against its own
    ``heights[k]`` x ``widths[k]`` (torchvision's ``RandomResizedCrop.get_params``: ten attempts,
    then the central crop with the aspect ratio clamped into ``ratio``). CPU, float64 sizes.

    Returns:
        ``[n, 4]`` int64 (top, left, height, width), in the image's own full-resolution pixels.
    """
    n = heights.shape[0]
    height = heights.to(torch.float64)[:, None]
    width = widths.to(torch.float64)[:, None]
    target = height * width * (scale[0] + (scale[1] - scale[0]) * torch.rand((n, 10), generator=generator,
                                                                              dtype=torch.float64))
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * torch.rand((n, 10), generator=generator, dtype=torch.float64))
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
    found = fits.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    height, width = height.squeeze(1), width.squeeze(1)
    in_ratio = width / height
    narrow, wide = in_ratio < min(ratio), in_ratio > max(ratio)
    fw = torch.where(wide, torch.round(height * max(ratio)), width)
    fh = torch.where(narrow, torch.round(width / min(ratio)), height)
    w = torch.where(found, w, fw)
    h = torch.where(found, h, fh)
    u = torch.rand((n, 2), generator=generator, dtype=torch.float64)
    top = torch.minimum(torch.floor(u[:, 0] * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(u[:, 1] * (width - w + 1)), width - w)
    top = torch.where(found, top, torch.div(height - h, 2, rounding_mode="floor"))
    left = torch.where(found, left, torch.div(width - w, 2, rounding_mode="floor"))
    return torch.stack([top, left, h, w], dim=1).to(torch.int64)


def sample_view_params(
    n: int, height: int, width: int, config: ViewConfig, generator: torch.Generator, device: torch.device
) -> ViewParams:
    """Draw every random parameter of one view for ``n`` samples (each sample its own)."""
    crop = sample_crop_params(n, height, width, config.crop_scale, config.crop_ratio, generator, device)
    flip = _rand((n,), generator, device) < config.flip_prob
    jitter = _rand((n,), generator, device) < config.jitter_prob
    b, c, s, hue = config.jitter
    factors = torch.stack([
        _uniform(n, max(0.0, 1 - b), 1 + b, generator, device),
        _uniform(n, max(0.0, 1 - c), 1 + c, generator, device),
        _uniform(n, max(0.0, 1 - s), 1 + s, generator, device),
        _uniform(n, -hue, hue, generator, device),
    ], dim=1)
    # torchvision's ColorJitter draws a fresh random order per image (randperm(4)); so do we, per sample.
    order = _rand((n, 4), generator, device).argsort(dim=1)
    grayscale = _rand((n,), generator, device) < config.grayscale_prob
    blur = _rand((n,), generator, device) < config.blur_prob
    blur_sigma = _uniform(n, config.blur_sigma[0], config.blur_sigma[1], generator, device)
    solarize = _rand((n,), generator, device) < config.solarize_prob
    return ViewParams(crop, flip, jitter, factors, order, grayscale, blur, blur_sigma, solarize)


# --------------------------------------------------------------------------------------------
# Ops on float images in [0, 1], batched with per-sample parameters
# --------------------------------------------------------------------------------------------

def resized_crop(images: Tensor, crop: Tensor, flip: Tensor, size: int) -> Tensor:
    """Crop each sample's box, flip where asked and resize to ``size`` in one ``grid_sample``.

    Bilinear, as torchvision's ``resized_crop``: source coordinates are clamped to the crop box,
    so enlarging a crop matches torchvision exactly. Departure: no antialias when a crop is
    larger than ``size`` (torchvision antialiases); at 32 px from 32 px images crops only enlarge.

    Args:
        images: float ``[n, C, H, W]``.
        crop: ``[n, 4]`` (top, left, height, width) from ``sample_crop_params``.
        flip: ``[n]`` bool, horizontal flip after the resize.
        size: output side.
    """
    n, _, height, width = images.shape
    top, left, h, w = crop.to(images.dtype).unbind(dim=1)
    o = torch.arange(size, device=images.device, dtype=images.dtype).add_(0.5)  # pixel centres
    ox = torch.where(flip[:, None], size - o, o)  # output column o reads column size-1-o when flipped
    # Source coordinate of each output pixel centre (align_corners=False), clamped into the box.
    sx = left[:, None] + ox * (w / size)[:, None] - 0.5
    sy = top[:, None] + o * (h / size)[:, None] - 0.5
    sx = torch.clamp(sx, min=left[:, None], max=(left + w - 1)[:, None])
    sy = torch.clamp(sy, min=top[:, None], max=(top + h - 1)[:, None])
    gx = sx.mul_(2 / width).add_(1 / width - 1)  # to grid_sample's [-1, 1]
    gy = sy.mul_(2 / height).add_(1 / height - 1)
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def rgb_to_grayscale(images: Tensor) -> Tensor:
    """``[n, 3, H, W]`` -> ``[n, 1, H, W]`` luma, as torchvision's ``rgb_to_grayscale``."""
    r, g, b = images.unbind(dim=1)
    return (r * _GRAY[0]).add_(g, alpha=_GRAY[1]).add_(b, alpha=_GRAY[2]).unsqueeze(1)


def _per_sample(values: Tensor) -> Tensor:
    return values.view(-1, 1, 1, 1)


def _blend(images: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    # torchvision: image * f + other * (1 - f), clamped; lerp is the same in one pass.
    return torch.lerp(other.expand_as(images), images, _per_sample(factor.to(images.dtype))).clamp_(0, 1)


def adjust_brightness(images: Tensor, factor: Tensor) -> Tensor:
    """Per-sample brightness factor ``[n]``, as torchvision's ``adjust_brightness``."""
    return (images * _per_sample(factor.to(images.dtype))).clamp_(0, 1)


def adjust_contrast(images: Tensor, factor: Tensor) -> Tensor:
    """Per-sample contrast factor: blend with the image's mean luma, as torchvision."""
    mean = rgb_to_grayscale(images).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(images, mean, factor)


def adjust_saturation(images: Tensor, factor: Tensor) -> Tensor:
    """Per-sample saturation factor: blend with the luma image, as torchvision."""
    return _blend(images, rgb_to_grayscale(images), factor)


def adjust_hue(images: Tensor, shift: Tensor) -> Tensor:
    """Per-sample hue shift in [-0.5, 0.5] (fraction of the hue circle), through HSV as torchvision.

    HSV keeps value (max) and saturation, so only the hue is computed (torchvision's branches:
    max == r, else max == g, else b) and RGB is rebuilt in closed form,
    ``channel = max - chroma * trapezoid(k)`` with ``k = 6h + (5, 3, 1)`` and
    ``trapezoid(k) = clamp(min(k, 4 - k), 0, 1)`` on the circle of 6. Written with arithmetic
    masks, floor and abs only: ``where``, ``remainder`` and ``aminmax`` are 10-40x slower on CPU.
    """
    r, g, b = images.unbind(dim=1)
    maxc, minc = images.amax(dim=1), images.amin(dim=1)
    chroma = maxc - minc
    inv = 1 / chroma.clamp(min=1e-12)  # chroma 0: grey pixel, the hue does not matter (s = 0)
    is_r = (maxc == r).to(images.dtype)
    is_g = (maxc == g).to(images.dtype) * (1 - is_r)
    is_b = 1 - is_r - is_g
    h6 = ((g - b) * is_r + (b - r + 2 * chroma) * is_g + (r - g + 4 * chroma) * is_b) * inv  # in [-1, 5)
    h6 = h6 + 6 * _per_sample(shift.to(images.dtype)).squeeze(1)
    h6 = h6 - 6 * torch.floor(h6 * (1 / 6))  # to [0, 6)
    n = _constant((5.0, 3.0, 1.0), images.dtype, images.device).view(1, 3, 1, 1)
    k = h6.unsqueeze(1) + n  # in [1, 11): the trapezoid centred at 2, and its copy at 8
    trapezoid = (2 - (k - 2).abs()).clamp_(0, 1) + (2 - (k - 8).abs()).clamp_(0, 1)
    return maxc.unsqueeze(1) - chroma.unsqueeze(1) * trapezoid


def gaussian_blur(images: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Per-sample gaussian blur (sigma ``[n]``), reflect padding, as torchvision's ``gaussian_blur``.

    One grouped separable convolution for the whole batch: each (sample, channel) plane gets its
    own 1-D kernel, vertical then horizontal.
    """
    n, c, height, width = images.shape
    if kernel_size <= 1 or n == 0:
        return images
    half = kernel_size // 2
    # torchvision's kernel: softmax(-(x / sigma)^2) on linspace(-lim, lim), lim = (k-1) / (2 sqrt 2).
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    x = torch.linspace(-lim, lim, kernel_size, dtype=images.dtype, device=images.device)
    kernel = torch.softmax(-(x[None, :] / sigma.to(images.dtype)[:, None]).pow(2), dim=1)  # [n, k]
    kernel = kernel[:, None, :].expand(n, c, kernel_size).reshape(n * c, kernel_size)  # [n*c, k], no sync (repeat_interleave may count on the host)
    padded = F.pad(images, (half, half, half, half), mode="reflect").reshape(1, n * c, height + 2 * half, width + 2 * half)
    out = F.conv2d(padded, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    out = F.conv2d(out, kernel.view(n * c, 1, 1, kernel_size), groups=n * c)
    return out.view(n, c, height, width)


def solarize(images: Tensor, threshold: float = _SOLARIZE_THRESHOLD) -> Tensor:
    """Invert pixels at or above ``threshold``, as torchvision's ``solarize`` on float images."""
    return torch.where(images >= threshold, 1 - images, images)


# --------------------------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------------------------

def color_jitter(images: Tensor, params: ViewParams, *, sync_free: bool = False) -> Tensor:
    """ColorJitter with each sample's own factors and own random order of the four ops.

    Four slots; in each slot every sample runs the op its order puts there. Brightness, contrast
    and saturation are all ``blend(x, target, f)`` with target 0, mean luma or luma, so one blend
    per slot serves every sample (factor 1, the identity, for samples that run hue in that slot
    or skip jitter). Hue: by default it runs on the rows whose slot says hue (each sample pays for
    one hue; ``nonzero`` waits for the device); with ``sync_free`` every row computes it and a
    mask keeps it.
    """
    return _color_jitter(images, params.jitter, params.factors, params.order, sync_free)


def _color_jitter(images: Tensor, jitter: Tensor, factors: Tensor, order: Tensor, sync_free: bool) -> Tensor:
    identity = _constant((1.0, 1.0, 1.0, 0.0), factors.dtype, images.device)
    factors = torch.where(jitter[:, None], factors, identity)
    x = images
    for slot in range(4):
        op = order[:, slot]
        factor = torch.where(op == 3, 1.0, factors.gather(1, op[:, None]).squeeze(1))
        gray = rgb_to_grayscale(x)
        # target: 0 for brightness, mean luma for contrast, luma for saturation (masks, not `where`: faster on CPU)
        mean = gray.mean(dim=(-2, -1), keepdim=True) * _per_sample(op == 1).to(x.dtype)
        target = torch.addcmul(mean, gray, _per_sample(op == 2).to(x.dtype))
        x = _blend(x, target, factor)
        hue = (op == 3) & jitter
        if sync_free:
            x = torch.where(_per_sample(hue), adjust_hue(x, factors[:, 3]), x)
        else:
            rows = torch.nonzero(hue).squeeze(1)
            if rows.numel():
                x[rows] = adjust_hue(x[rows], factors[rows, 3])
    return x


def augment_views(images: Tensor, params: ViewParams, size: int, blur_kernel: int, *,
                  sync_free: bool | None = None) -> Tensor:
    """Apply per-sample parameters to float images in [0, 1] (one row of ``params`` per image).

    Args:
        images: float ``[n, 3, H, W]`` in [0, 1].
        params: one row per image (``sample_view_params``).
        size: output side.
        blur_kernel: the blur's kernel size (1: no blur).
        sync_free: True: no host sync and no branch on a tensor's value (``augment_views_sync_free``),
            what a GPU wants; False: the ops run on the rows that draw them, selected with
            ``nonzero`` (less work, what a CPU wants). None: True off the CPU. Same values either way.

    Returns floats in [0, 1], ``[n, 3, size, size]``; not normalised.
    """
    if sync_free is None:
        sync_free = images.device.type != "cpu"
    if sync_free:
        return augment_views_sync_free(images, params.crop, params.flip, params.jitter, params.factors,
                                       params.order, params.grayscale, params.blur, params.blur_sigma,
                                       params.solarize, size, blur_kernel)
    x = resized_crop(images, params.crop, params.flip, size)
    if bool(params.jitter.any()):
        x = color_jitter(x, params)
    rows = torch.nonzero(params.grayscale).squeeze(1)
    if rows.numel():
        x[rows] = rgb_to_grayscale(x[rows]).expand(-1, 3, -1, -1)
    rows = torch.nonzero(params.blur).squeeze(1)
    if rows.numel() and blur_kernel > 1:
        x[rows] = gaussian_blur(x[rows], params.blur_sigma[rows], blur_kernel)
    rows = torch.nonzero(params.solarize).squeeze(1)
    if rows.numel():
        x[rows] = solarize(x[rows])
    return x


def augment_views_sync_free(images: Tensor, crop: Tensor, flip: Tensor, jitter: Tensor, factors: Tensor,
                            order: Tensor, grayscale: Tensor, blur: Tensor, blur_sigma: Tensor,
                            solarize_mask: Tensor, size: int, blur_kernel: int) -> Tensor:
    """``augment_views`` for a device that should never wait: one fixed sequence of whole-batch ops.

    No ``nonzero``, ``.item()``, boolean indexing or branch on a tensor's value: every op runs on
    the whole batch and ``torch.where`` keeps it per sample (the samples a mask leaves out pay the
    op's arithmetic; on a GPU that is cheaper than a host round-trip). So the sequence of kernels
    depends on the shapes alone: ``torch.compile(fullgraph=True)`` fuses it, and one batch shape
    can be captured as a CUDA graph (``TwoViewAugment(compile=...)``). Plain tensors in, not a
    ``ViewParams``, so that compiled graphs take them as inputs.

    Same values as the row-selecting path: a sample not jittered goes through blends of factor 1
    (``lerp`` with weight 1 returns its end exactly), every other op is selected, not blended.
    """
    x = resized_crop(images, crop, flip, size)
    x = _color_jitter(x, jitter, factors, order, sync_free=True)
    x = torch.where(_per_sample(grayscale), rgb_to_grayscale(x).expand(-1, 3, -1, -1), x)
    if blur_kernel > 1:  # a setting, not a tensor value
        x = torch.where(_per_sample(blur), gaussian_blur(x, blur_sigma, blur_kernel), x)
    return torch.where(_per_sample(solarize_mask), solarize(x), x)


def _normalized_view(images: Tensor, crop: Tensor, flip: Tensor, jitter: Tensor, factors: Tensor,
                     order: Tensor, grayscale: Tensor, blur: Tensor, blur_sigma: Tensor,
                     solarize_mask: Tensor, size: int, blur_kernel: int) -> Tensor:
    """One view, normalised: the function ``TwoViewAugment(compile=...)`` compiles."""
    x = augment_views_sync_free(images, crop, flip, jitter, factors, order, grayscale, blur, blur_sigma,
                                solarize_mask, size, blur_kernel)
    mean = torch.tensor(MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)  # constants of the graph
    std = torch.tensor(STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _blur_kernel(config: ViewConfig) -> int:
    """The view's blur kernel, 1 (no blur op at all) when the view never blurs: the sync-free ops
    would otherwise blur every sample to keep none (the CIFAR convention turns blur off)."""
    return config.blur_kernel_size if config.blur_prob > 0 else 1


COMPILE_MODES = (False, True, "reduce-overhead")
_COMPILE_FAILED: set[object] = set()
_COMPILED: dict[object, object] = {}  # per process, not per augmenter: a new augmenter each epoch reuses it


def _compiled_view(mode: bool | str):  # type: ignore[no-untyped-def]
    if mode not in _COMPILED:
        _COMPILED[mode] = torch.compile(_normalized_view, fullgraph=True, dynamic=False,
                                        mode="reduce-overhead" if mode == "reduce-overhead" else None)
    return _COMPILED[mode]


def _pair(value: object, name: str) -> tuple[float, float]:
    if isinstance(value, (int, float)):
        return float(value), float(value)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return float(value[0]), float(value[1])
    raise DataError(f"augmentation override {name}={value!r}: give a number or a (view1, view2) pair")


def _check_range(name: str, value: tuple[float, ...], lo: float, hi: float) -> None:
    if len(value) != 2 or not (lo <= value[0] <= value[1] <= hi):
        raise DataError(f"augmentation override {name}={value!r}: expected (min, max) with {lo} <= min <= max <= {hi}")


def resolve_views(preset: str, size: int, **overrides: object) -> tuple[ViewConfig, ViewConfig]:
    """Preset values + overrides -> the two views' settings.

    The CIFAR convention (SimCLR App. B.9) applies when ``size <= 32``: no blur (override with
    ``blur=True``) and, for SimCLR, colour strength s=0.5 (override with ``jitter_strength=1.0``).
    """
    if preset not in PRESETS:
        raise DataError(f"augmentation preset {preset!r} is unknown; choose one of {sorted(PRESETS)}")
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise DataError(f"augmentation override(s) {unknown} unknown; allowed: {list(OVERRIDES)}")
    if not isinstance(size, int) or size < 1:
        raise DataError(f"augmentation size {size!r} must be a positive int")
    cfg = dict(PRESETS[preset])
    cfg.update({k: v for k, v in overrides.items() if k not in ("blur", "jitter_strength", "blur_kernel_size")})
    cifar = size <= 32
    strength = overrides.get("jitter_strength")
    if strength is None:
        strength = 0.5 if (cifar and preset == "simclr") else 1.0
    blur = overrides.get("blur")
    if blur is None:
        blur = not cifar
    kernel = int(overrides.get("blur_kernel_size") or blur_kernel_size(size))  # type: ignore[call-overload]
    if kernel % 2 == 0:
        raise DataError(f"augmentation override blur_kernel_size={kernel}: must be odd")

    jitter = tuple(float(v) * float(strength) for v in cfg["jitter"])  # type: ignore[union-attr, arg-type]
    if len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
        raise DataError(f"augmentation jitter {jitter}: four non-negative strengths, hue <= 0.5")
    crop_scale = tuple(float(v) for v in cfg["crop_scale"])  # type: ignore[union-attr]
    crop_ratio = tuple(float(v) for v in cfg["crop_ratio"])  # type: ignore[union-attr]
    blur_sigma = tuple(float(v) for v in cfg["blur_sigma"])  # type: ignore[union-attr]
    _check_range("crop_scale", crop_scale, 1e-6, 1.0)
    _check_range("crop_ratio", crop_ratio, 1e-6, math.inf)
    _check_range("blur_sigma", blur_sigma, 1e-6, math.inf)
    blur_prob = _pair(cfg["blur_prob"], "blur_prob")
    if not blur:
        blur_prob = (0.0, 0.0)
    solarize_prob = _pair(cfg["solarize_prob"], "solarize_prob")
    for name in ("flip_prob", "jitter_prob", "grayscale_prob"):
        if not 0.0 <= float(cfg[name]) <= 1.0:  # type: ignore[arg-type]
            raise DataError(f"augmentation override {name}={cfg[name]!r}: a probability in [0, 1]")
    for name, pair in (("blur_prob", blur_prob), ("solarize_prob", solarize_prob)):
        if not all(0.0 <= p <= 1.0 for p in pair):
            raise DataError(f"augmentation override {name}={pair!r}: probabilities in [0, 1]")
    views = tuple(
        ViewConfig(
            crop_scale=crop_scale, crop_ratio=crop_ratio, flip_prob=float(cfg["flip_prob"]),  # type: ignore[arg-type]
            jitter=jitter, jitter_prob=float(cfg["jitter_prob"]),  # type: ignore[arg-type]
            grayscale_prob=float(cfg["grayscale_prob"]),  # type: ignore[arg-type]
            blur_prob=blur_prob[v], blur_sigma=blur_sigma, blur_kernel_size=kernel,  # type: ignore[arg-type]
            solarize_prob=solarize_prob[v],
        )
        for v in (0, 1)
    )
    return views[0], views[1]  # type: ignore[return-value]


def resolve_local_view(preset: str, size: int, local_size: int, **overrides: object) -> ViewConfig:
    """The local crops' settings: the preset's first view with DINO's local crop scale, blur and
    solarize (``LOCAL_*``). Blur follows the global views' CIFAR convention (off when ``size <= 32`` unless
    ``blur=True``), with a kernel of 10% of ``local_size``."""
    first, _ = resolve_views(preset, size, **overrides)
    blur = overrides.get("blur")
    if blur is None:
        blur = size > 32
    return dataclasses.replace(first, crop_scale=LOCAL_CROP_SCALE, solarize_prob=LOCAL_SOLARIZE_PROB,
                               blur_prob=LOCAL_BLUR_PROB if blur else 0.0,
                               blur_kernel_size=blur_kernel_size(local_size))


@contextmanager
def _one_intra_op_thread(device: torch.device) -> Iterator[None]:
    """Run tiny CPU ops (the ~25 of drawing parameters, on [n] or [n, 10] tensors) on the calling
    thread alone. With 2 intra-op threads PyTorch still forks OpenMP regions for some of them
    (exp, round: grain 2048 elements) and each region waits for a second core; on the shared
    2-core machine (load 5-8) that made drawing 512 samples' parameters 20-50x slower than on one
    thread and the whole call 5-8x slower. Same values either way (the generator is serial).
    ``torch.set_num_threads`` sets the calling thread's OpenMP team size only; restored after."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class TwoViewAugment:
    """Two random views per image, batched and on the images' device.

    Args:
        preset: ``"simclr"``, ``"moco_v2"`` or ``"byol"`` (paper values, see ``PRESETS``).
        size: output side in pixels.
        seed: seeds one ``torch.Generator`` per device, once; successive calls differ, the same
            seed replays the same views (on the same device type and backend). ``None``: drawn
            from torch's global RNG, so ``torch.manual_seed`` makes it reproducible too.
        backend: ``"auto"`` (numba for CPU tensors, PyTorch elsewhere), ``"numba"`` (CPU only) or
            ``"torch"``. Both give the same views to ~1e-6 for the same parameters.
        local_crops: V, DINO's local crops per image (0: none, the call returns two views).
            Their parameters are drawn after the two global views', so adding local crops leaves
            the global views of a seed unchanged.
        local_size: side of the local crops; None = ``local_crop_size(size)``.
        sync_free: the PyTorch backend's op sequence (``augment_views``): True = masks and
            ``torch.where``, no host sync; False = ops on the rows that draw them; None = True off
            the CPU. Same views either way.
        compile: off the CPU, run each view's ops as one ``torch.compile``-d graph (``fullgraph``,
            static shapes): False, True (Inductor's fused kernels) or ``"reduce-overhead"`` (also
            a CUDA graph per batch shape). The first call of a shape pays the compile.
        **overrides: any of ``OVERRIDES``, e.g. ``crop_scale=(0.2, 1.0)``, ``jitter_strength=0.5``,
            ``blur_prob=0.0`` or ``blur_prob=(1.0, 0.1)``, ``blur=False``.

    Example:
        >>> aug = TwoViewAugment("simclr", size=32, seed=0)
        >>> v1, v2 = aug(torch.zeros(8, 3, 32, 32, dtype=torch.uint8))
        >>> v1.shape, v1.dtype
        (torch.Size([8, 3, 32, 32]), torch.float32)
    """

    def __init__(self, preset: str = "simclr", size: int = 32, seed: int | None = None, *,
                 backend: str = "auto", local_crops: int = 0, local_size: int | None = None,
                 sync_free: bool | None = None, compile: bool | str = False, **overrides: object) -> None:
        if backend not in BACKENDS:
            raise DataError(f"augmentation backend {backend!r} is unknown; choose one of {list(BACKENDS)}")
        if compile not in COMPILE_MODES:
            raise DataError(f"augmentation compile={compile!r}: choose one of {list(COMPILE_MODES)}")
        self.sync_free = sync_free
        self.compile = compile
        if not isinstance(local_crops, int) or local_crops < 0:
            raise DataError(f"augmentation local_crops={local_crops!r}: a non-negative int")
        self.preset = preset
        self.size = size
        self.backend = backend
        self.views = resolve_views(preset, size, **overrides)
        self.local_crops = local_crops
        self.local_size = local_crop_size(size) if local_size is None else local_size
        if not isinstance(self.local_size, int) or self.local_size < 1:
            raise DataError(f"augmentation local_size={local_size!r}: a positive int")
        self.local_view = resolve_local_view(preset, size, self.local_size, **overrides) if local_crops else None
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0  # a forked child has none of its parent's pool threads: it makes its own
        self.seed = int(torch.randint(0, 2**62, (), dtype=torch.int64)) if seed is None else int(seed)
        self._generators: dict[str, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            self._generators[key] = g
        return self._generators[key]

    def __call__(self, images: Tensor, return_params: bool = False):  # type: ignore[no-untyped-def]
        """uint8 ``[B, C, H, W]`` (C = 1 or 3) -> ``(view1, view2)``, float32 ``[B, 3, size, size]``.

        With ``local_crops=V > 0`` -> ``(view1, view2, local)``, local float32
        ``[V, B, 3, local_size, local_size]``. With ``return_params=True`` the parameters come last:
        ``(view1, view2, [local,] (params1, params2, *local_params))``.
        """
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise DataError(
                f"TwoViewAugment takes a uint8 batch [B, C, H, W] with C 1 or 3; got {images.dtype} {tuple(images.shape)}"
            )
        n, _, height, width = images.shape
        device = images.device
        g = self._generator(device)
        with _one_intra_op_thread(device):
            params = [sample_view_params(n, height, width, self.views[0], g, device),
                      sample_view_params(n, height, width, self.views[1], g, device)]
            if self.local_view is not None:
                params += [sample_view_params(n, height, width, self.local_view, g, device)
                           for _ in range(self.local_crops)]
        return self._views([images] * len(params), params, return_params)

    def view_configs(self) -> list[ViewConfig]:
        """The settings of every view a call makes, in output order: the two global views, then
        ``local_crops`` local ones."""
        return list(self.views) + ([self.local_view] * self.local_crops if self.local_view is not None else [])

    def view_sizes(self) -> list[int]:
        """The output side of every view, in the order of ``view_configs``."""
        return [self.size, self.size] + [self.local_size] * (self.local_crops if self.local_view is not None else 0)

    def crop_boxes(self, heights: Tensor, widths: Tensor) -> list[Tensor]:
        """Every view's crop box for images of their own sizes (``sample_crop_boxes``, one ``[n, 4]``
        per view, from this augmenter's CPU generator): where ``pipelines.decode`` cuts the views
        out of whole photos before ``augment_cropped`` does the rest."""
        g = self._generator(torch.device("cpu"))
        return [sample_crop_boxes(heights, widths, c.crop_scale, c.crop_ratio, g) for c in self.view_configs()]

    def augment_cropped(self, crops: list[Tensor], return_params: bool = False):  # type: ignore[no-untyped-def]
        """The views of a call from views already cut and resized: ``crops[k]`` uint8
        ``[B, C, S_k, S_k]`` is view k's crop (``view_sizes`` order); flip, colour jitter,
        grayscale, blur and solarize are drawn and applied as in ``__call__`` (the crop of each
        sample is then the whole ``S_k`` square). Same outputs as ``__call__``.
        """
        configs = self.view_configs()
        if len(crops) != len(configs):
            raise DataError(f"augment_cropped takes {len(configs)} crop batches (one per view), got {len(crops)}")
        device = crops[0].device
        g = self._generator(device)
        params = []
        with _one_intra_op_thread(device):
            for crop, config in zip(crops, configs):
                n, _, height, width = crop.shape
                p = sample_view_params(n, height, width, config, g, device)
                p.crop = torch.tensor([0, 0, height, width], dtype=torch.int64, device=device).expand(n, 4)
                params.append(p)
        return self._views(crops, params, return_params)

    def _views(self, sources: list[Tensor], params: list[ViewParams], return_params: bool):  # type: ignore[no-untyped-def]
        """Run view k (``params[k]``) on ``sources[k]`` into the outputs of ``__call__``."""
        n = sources[0].shape[0]
        device = sources[0].device
        configs = list(self.views)
        outs = [torch.empty(2 * n, 3, self.size, self.size, dtype=torch.float32, device=device)]
        if self.local_view is not None:
            configs += [self.local_view] * self.local_crops
            outs.append(torch.empty(self.local_crops * n, 3, self.local_size, self.local_size,
                                    dtype=torch.float32, device=device))
        # targets[k]: where view k's n rows go (rows k*n.. of the global block, then of the local one)
        targets = [outs[0][k * n:(k + 1) * n] for k in range(2)]
        targets += [outs[1][k * n:(k + 1) * n] for k in range(self.local_crops if self.local_view else 0)]
        if self._numba(device):
            self._numba_views(sources, params, configs, targets)
        else:
            self._torch_views(sources, params, configs, targets)
        result: list[Tensor] = [outs[0][:n], outs[0][n:]]
        if self.local_view is not None:
            result.append(outs[1].view(self.local_crops, n, 3, self.local_size, self.local_size))
        if return_params:
            return (*result, tuple(params))
        return tuple(result)

    def _torch_views(self, sources: list[Tensor], params: list[ViewParams], configs: list[ViewConfig],
                     targets: list[Tensor]) -> None:
        """Every view with the PyTorch ops, normalised, written into its target ``[n, 3, S, S]``
        (view k made from ``sources[k]``; the same tensor for all views in ``__call__``)."""
        floats: dict[int, Tensor] = {}
        for images in sources:
            if id(images) not in floats:
                n, _, height, width = images.shape
                x = images.expand(n, 3, height, width) if images.shape[1] == 1 else images
                floats[id(images)] = x.to(torch.float32).mul_(1 / 255)
        on_cpu = sources[0].device.type == "cpu"
        sync_free = (not on_cpu) if self.sync_free is None else self.sync_free
        if self.compile and not on_cpu and sources[0].shape[0] and self.compile not in _COMPILE_FAILED:
            view = _compiled_view(self.compile)
            try:
                for images, p, config, target in zip(sources, params, configs, targets):
                    target.copy_(view(floats[id(images)], p.crop, p.flip, p.jitter, p.factors, p.order, p.grayscale,
                                      p.blur, p.blur_sigma, p.solarize, target.shape[-1], _blur_kernel(config)))
                return
            except Exception as e:  # noqa: BLE001 - a compiler fault must not stop training: the eager ops are exact
                _COMPILE_FAILED.add(self.compile)
                warnings.warn(f"TwoViewAugment: torch.compile of the views failed ({type(e).__name__}: {e}); "
                              "the eager PyTorch ops run instead", RuntimeWarning, stacklevel=2)
        # On CPU, chunks of a few hundred KiB per tensor stay in cache between the ~50 elementwise
        # ops; on an accelerator one launch per op for the whole batch is better.
        for images, p, config, target in zip(sources, params, configs, targets):
            x = floats[id(images)]
            n = images.shape[0]
            side = target.shape[-1]
            chunk = max(8, (256 * 32 * 32) // (side * side)) if on_cpu else max(n, 1)
            for start in range(0, n, chunk):
                rows = slice(start, min(n, start + chunk))
                part = ViewParams(*(t[rows] for t in vars(p).values()))
                target[rows] = _normalize_unit(augment_views(x[rows], part, side, _blur_kernel(config),
                                                             sync_free=sync_free))

    def _numba(self, device: torch.device) -> bool:
        if self.backend == "torch":
            return False
        if device.type != "cpu":
            if self.backend == "numba":
                raise DataError(f"augmentation backend 'numba' runs on CPU tensors only, got {device}; "
                                "use backend='auto' or 'torch'")
            return False
        return True

    def _numba_views(self, sources: list[Tensor], params: list[ViewParams], configs: list[ViewConfig],
                     targets: list[Tensor]) -> None:
        """Every view with the numba kernel, into its contiguous target ``[n, 3, S, S]`` (view k
        made from ``sources[k]``); rows split over ``torch.get_num_threads()`` threads."""
        from pipelines.augment_numba import augment_views_into

        n = sources[0].shape[0]
        if n == 0:
            return
        mean, std = np.asarray(MEAN, np.float32), np.asarray(STD, np.float32)
        # a part under 64 images (16 at photo sizes: ~0.5 ms of work each) is not worth a thread
        per_part = 64 if max(t.shape[-1] for t in targets) <= 64 else 16
        parts = max(1, min(torch.get_num_threads(), n // per_part))
        bounds = np.linspace(0, n, parts + 1).astype(np.int64)
        jobs = []
        arrays_of: dict[int, np.ndarray] = {}
        for images, p, config, target in zip(sources, params, configs, targets):
            if id(images) not in arrays_of:
                arrays_of[id(images)] = images.contiguous().numpy()
            src = arrays_of[id(images)]
            dst = target.numpy()  # a contiguous row block of the output: writes land in place
            arrays = [t.contiguous().numpy() for t in (p.crop, p.flip, p.jitter, p.factors.float(), p.order,
                                                        p.grayscale, p.blur, p.blur_sigma.float(), p.solarize)]
            kernel = config.blur_kernel_size
            for a, b in zip(bounds[:-1], bounds[1:]):
                crop, flip, jitter, factors, order, gray, blur, sigma, solar = (x[a:b] for x in arrays)
                jobs.append((src[a:b], dst[a:b], crop, flip, jitter, factors, order, gray, blur,
                             sigma, kernel, solar, mean, std))
        if parts == 1:
            for job in jobs:
                augment_views_into(*job)
        else:
            if self._pool is None or self._pool._max_workers < parts or self._pool_pid != os.getpid():  # type: ignore[attr-defined]
                self._pool = ThreadPoolExecutor(parts, thread_name_prefix="selfsup-augment")
                self._pool_pid = os.getpid()
            list(self._pool.map(lambda job: augment_views_into(*job), jobs))

    def __getstate__(self) -> dict[str, object]:  # the thread pool does not pickle (Ray ships augmenters)
        return {**self.__dict__, "_pool": None}
