"""The CPU kernel of `TwoViewAugment`: all ops of one view fused per image, compiled with numba.

`pipelines.augment` writes each op as whole-batch PyTorch calls, which is what a GPU wants (one
launch per op) but on a CPU means ~90 passes over memory per view: crop+flip+resize, four colour
jitter slots, grayscale, blur, solarize and normalise. This module applies the same per-sample
parameters (drawn by `pipelines.augment.sample_view_params`, so seeds and distributions are shared)
one image at a time, every op on a 12 KiB working set that stays in L1. Measured on the 2-core
machine (`benchmarks/pipeline_throughput.py`, 256 CIFAR-10 images, 1 thread): ~7 us per view,
against ~35 us for the PyTorch ops (the HSV hue shift alone was 19 us there).

The arithmetic follows the PyTorch ops line by line (same formulas, float32), so the two agree to
~1e-6 (`tests/pipelines/test_augment.py` compares both with torchvision and with each other).
Same design as FFCV's numba-compiled CPU augmentations (Leclerc et al., 2023).

Compiled on first use and cached next to this file (`cache=True`: ~3 s once, then ~0.5 s per
process to load). `nogil=True`: Python threads run it in parallel.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

# ITU-R 601 luma, as pipelines.augment._GRAY and torchvision.
_GR, _GG, _GB = np.float32(0.2989), np.float32(0.587), np.float32(0.114)
_ONE, _ZERO, _HALF = np.float32(1.0), np.float32(0.0), np.float32(0.5)

_jit = nb.njit(cache=True, nogil=True, fastmath=True, boundscheck=False)


@_jit
def _clamp01(v):  # type: ignore[no-untyped-def]
    return min(max(v, _ZERO), _ONE)


@_jit
def _resized_crop(img, t, top, left, h, w, flip, x0s, x1s, wxs):  # type: ignore[no-untyped-def]
    """`augment.resized_crop` for one image: bilinear `grid_sample` (align_corners=False) at the
    box's pixel centres, source coordinates clamped into the box; uint8 in, [0, 1] float out."""
    c_in, height, width = img.shape
    size = t.shape[1]
    scale = np.float32(1.0 / 255.0)
    fw = np.float32(w) / np.float32(size)
    fh = np.float32(h) / np.float32(size)
    for ox in range(size):
        o = np.float32(ox) + _HALF
        if flip:
            o = np.float32(size) - o  # output column o reads column size-1-o
        sx = min(max(np.float32(left) + o * fw - _HALF, np.float32(left)), np.float32(left + w - 1))
        x0 = int(math.floor(sx))
        x0s[ox] = x0
        x1s[ox] = min(x0 + 1, width - 1)
        wxs[ox] = sx - np.float32(x0)
    for oy in range(size):
        sy = np.float32(top) + (np.float32(oy) + _HALF) * fh - _HALF
        sy = min(max(sy, np.float32(top)), np.float32(top + h - 1))
        y0 = int(math.floor(sy))
        wy = sy - np.float32(y0)
        y1 = min(y0 + 1, height - 1)
        for c in range(3):
            src = c if c_in == 3 else 0  # one-channel input: the same plane three times
            r0 = img[src, y0]
            r1 = img[src, y1]
            row = t[c, oy]
            for ox in range(size):
                a = np.float32(r0[x0s[ox]]) * scale
                b = np.float32(r0[x1s[ox]]) * scale
                d = np.float32(r1[x0s[ox]]) * scale
                e = np.float32(r1[x1s[ox]]) * scale
                wx = wxs[ox]
                upper = a + (b - a) * wx
                lower = d + (e - d) * wx
                row[ox] = upper + (lower - upper) * wy


@_jit
def _color_jitter(x, factors, order, luma):  # type: ignore[no-untyped-def]
    """`augment.color_jitter` for one image `x` [3, n]: the four ops in this sample's order."""
    n = x.shape[1]
    red, green, blue = x[0], x[1], x[2]
    for slot in range(4):
        op = order[slot]
        f = np.float32(factors[op])
        if op == 0:  # brightness: blend with black
            for c in range(3):
                xc = x[c]
                for i in range(n):
                    xc[i] = _clamp01(xc[i] * f)
        elif op == 1:  # contrast: blend with the mean luma
            total = 0.0
            for i in range(n):
                total += _GR * red[i] + _GG * green[i] + _GB * blue[i]
            m = np.float32(total / n)
            for c in range(3):
                xc = x[c]
                for i in range(n):
                    xc[i] = _clamp01(m + f * (xc[i] - m))
        elif op == 2:  # saturation: blend with the luma image
            for i in range(n):
                luma[i] = _GR * red[i] + _GG * green[i] + _GB * blue[i]
            for c in range(3):
                xc = x[c]
                for i in range(n):
                    li = luma[i]
                    xc[i] = _clamp01(li + f * (xc[i] - li))
        else:  # hue: through HSV, as augment.adjust_hue (same closed form, same tie-breaking)
            shift6 = np.float32(6.0) * f
            for i in range(n):
                r = red[i]
                g = green[i]
                b = blue[i]
                maxc = max(r, max(g, b))
                chroma = maxc - min(r, min(g, b))
                inv = _ONE / max(chroma, np.float32(1e-12))
                is_r = _ONE if maxc == r else _ZERO
                is_g = (_ONE if maxc == g else _ZERO) * (_ONE - is_r)
                is_b = _ONE - is_r - is_g
                h6 = ((g - b) * is_r + (b - r + 2 * chroma) * is_g + (r - g + 4 * chroma) * is_b) * inv
                h6 = h6 + shift6
                h6 = h6 - np.float32(6.0) * np.float32(math.floor(h6 * np.float32(1.0 / 6.0)))
                kr = h6 + np.float32(5.0)
                kg = h6 + np.float32(3.0)
                kb = h6 + np.float32(1.0)
                red[i] = maxc - chroma * (_clamp01(2 - abs(kr - 2)) + _clamp01(2 - abs(kr - 8)))
                green[i] = maxc - chroma * (_clamp01(2 - abs(kg - 2)) + _clamp01(2 - abs(kg - 8)))
                blue[i] = maxc - chroma * (_clamp01(2 - abs(kb - 2)) + _clamp01(2 - abs(kb - 8)))


@_jit
def _reflect(i, n):  # type: ignore[no-untyped-def]
    if i < 0:
        return -i
    if i >= n:
        return 2 * (n - 1) - i
    return i


@_jit
def _gaussian_blur(t, sigma, ksize, weights, scratch):  # type: ignore[no-untyped-def]
    """`augment.gaussian_blur` for one image `t` [3, S, S]: reflect padding, vertical then horizontal.

    Both passes run along rows (contiguous, so numba vectorises the inner loop): the vertical pass
    adds `weights[j] *` a whole reflected source row into the output row; the horizontal pass reads
    a row padded by reflection once into `scratch`'s spare row. The first version walked each
    column pixel by pixel with a reflect test per tap: at 224 px (23 taps) the blur took ~7/8 of a
    view's time (`benchmarks/photo_pipeline.py`).
    """
    size = t.shape[1]
    half = ksize // 2
    lim = (ksize - 1) / (2.0 * math.sqrt(2.0))
    total = 0.0
    for j in range(ksize):
        x = -lim + 2.0 * lim * j / (ksize - 1)
        weights[j] = math.exp(-(x / sigma) ** 2)
        total += weights[j]
    for j in range(ksize):
        weights[j] = np.float32(weights[j] / total)
    rows = scratch[0]        # [S, S]: the vertical pass's output of one channel
    padded = scratch[1, 0]   # [S] at least S + 2*half long: see augment_views_into
    for c in range(3):
        plane = t[c]
        for y in range(size):
            out = rows[y]
            w0 = weights[0]
            src = plane[_reflect(y - half, size)]
            for x in range(size):
                out[x] = w0 * src[x]
            for j in range(1, ksize):
                wj = weights[j]
                src = plane[_reflect(y + j - half, size)]
                for x in range(size):
                    out[x] += wj * src[x]
        for y in range(size):
            src = rows[y]
            for x in range(size):
                padded[x + half] = src[x]
            for k in range(1, half + 1):
                padded[half - k] = src[k]
                padded[half + size - 1 + k] = src[size - 1 - k]
            dst = plane[y]
            w0 = weights[0]
            for x in range(size):
                dst[x] = w0 * padded[x]
            for j in range(1, ksize):
                wj = weights[j]
                for x in range(size):
                    dst[x] += wj * padded[x + j]


@_jit
def augment_views_into(images, out, crop, flip, jitter, factors, order, grayscale, blur, blur_sigma, blur_kernel,
                       solarize, mean, std):  # type: ignore[no-untyped-def]
    """Write one normalised view per image into `out` [n, 3, S, S] (float32, C-contiguous).

    Args:
        images: uint8 [n, C, H, W], C 1 or 3, C-contiguous.
        crop ... solarize: the fields of `augment.ViewParams` as numpy arrays (one row per image).
        blur_kernel: the odd blur kernel size (1: no blur).
        mean, std: float32 [3], the normalisation.
    """
    size = out.shape[2]
    npix = size * size
    x0s = np.empty(size, np.int64)
    x1s = np.empty(size, np.int64)
    wxs = np.empty(size, np.float32)
    luma = np.empty(npix, np.float32)
    weights = np.empty(max(blur_kernel, 1), np.float32)
    # blur scratch: [0] one channel's vertical pass, [1, 0] one row padded by reflection
    scratch = np.empty((2, size, size + 2 * (max(blur_kernel, 1) // 2)), np.float32)
    for s in range(images.shape[0]):
        t = out[s]
        _resized_crop(images[s], t, crop[s, 0], crop[s, 1], crop[s, 2], crop[s, 3], flip[s], x0s, x1s, wxs)
        x = t.reshape(3, npix)
        if jitter[s]:
            _color_jitter(x, factors[s], order[s], luma)
        if grayscale[s]:
            for i in range(npix):
                g = _GR * x[0, i] + _GG * x[1, i] + _GB * x[2, i]
                x[0, i] = g
                x[1, i] = g
                x[2, i] = g
        if blur[s] and blur_kernel > 1:
            _gaussian_blur(t, blur_sigma[s], blur_kernel, weights, scratch)
        if solarize[s]:
            for c in range(3):
                xc = x[c]
                for i in range(npix):
                    v = xc[i]
                    xc[i] = _ONE - v if v >= _HALF else v
        for c in range(3):
            m = mean[c]
            inv = _ONE / std[c]
            xc = x[c]
            for i in range(npix):
                xc[i] = (xc[i] - m) * inv
