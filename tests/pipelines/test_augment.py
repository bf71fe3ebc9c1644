"""TwoViewAugment against torchvision, on real photos.

Images: two photos that scikit-learn ships (china.jpg, flower.jpg; present on a fresh machine)
cut into tiles, and real CIFAR-10 JPEGs decoded with torchvision (the `cifar10_dir` fixture).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import RandomResizedCrop

from pipelines.augment import (
    MEAN,
    PRESETS,
    STD,
    TwoViewAugment,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
    normalize,
    resized_crop,
    rgb_to_grayscale,
    sample_crop_params,
    sample_view_params,
    solarize,
)
from pipelines.errors import DataError

TOL = 1e-5  # float32 arithmetic in a different order than torchvision's


def _photo_tiles(side: int = 32, n: int = 48) -> torch.Tensor:
    """``n`` uint8 tiles [n, 3, side, side] from scikit-learn's two sample photos, downscaled."""
    from sklearn.datasets import load_sample_image

    tiles = []
    for name in ("china.jpg", "flower.jpg"):
        img = torch.from_numpy(load_sample_image(name)).permute(2, 0, 1)  # [3, 427, 640]
        img = TF.resize(img, [side * 4], antialias=True)  # shorter side 4 tiles
        h, w = img.shape[-2:]
        for i in range(0, h - side + 1, side):
            for j in range(0, w - side + 1, side):
                tiles.append(img[:, i:i + side, j:j + side])
    return torch.stack(tiles[:n]).contiguous()


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    return _photo_tiles()


@pytest.fixture(scope="module")
def cifar(cifar10_dir) -> torch.Tensor:
    table = pq.read_table(cifar10_dir / "test-00000-of-00001.parquet", columns=["image"]).slice(0, 48)
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in table.column("image").to_pylist()]
    with warnings.catch_warnings():  # torchvision 0.29 points to TorchCodec; its decoder still works
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.stack(decode_jpeg(data, mode=ImageReadMode.RGB))


@pytest.fixture(params=["photos", "cifar"])
def images(request) -> torch.Tensor:
    """Real uint8 images [48, 3, 32, 32]: the sample photos, then CIFAR-10."""
    return request.getfixturevalue(request.param)


# ---------------------------------------------------------------- crop parameters vs torchvision

def _ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov distance."""
    grid = np.union1d(a, b)
    ca = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(ca - cb).max())


@pytest.mark.parametrize(("height", "width", "scale", "ratio"), [
    (32, 32, (0.08, 1.0), (3 / 4, 4 / 3)),   # SimCLR / BYOL
    (32, 32, (0.2, 1.0), (3 / 4, 4 / 3)),    # MoCo v2
    (40, 64, (0.08, 1.0), (3 / 4, 4 / 3)),   # not square
    (32, 32, (0.9, 1.0), (2.0, 3.0)),        # most attempts fail: torchvision's central fallback
])
def test_crop_distribution_matches_torchvision(height, width, scale, ratio) -> None:
    n = 3000
    torch.manual_seed(0)
    dummy = torch.empty(3, height, width)
    ref = np.array([RandomResizedCrop.get_params(dummy, list(scale), list(ratio)) for _ in range(n)], dtype=float)
    ours = sample_crop_params(n, height, width, scale, ratio, torch.Generator().manual_seed(0)).numpy().astype(float)
    assert ((ours[:, 2] >= 1) & (ours[:, 0] + ours[:, 2] <= height)).all()
    assert ((ours[:, 3] >= 1) & (ours[:, 1] + ours[:, 3] <= width)).all()
    # KS critical distance for 3000 vs 3000 samples at alpha = 0.001: 1.95 * sqrt(2 / 3000) = 0.050
    for name, stat in [
        ("area", lambda p: p[:, 2] * p[:, 3] / (height * width)),
        ("aspect", lambda p: p[:, 3] / p[:, 2]),
        ("top", lambda p: p[:, 0]),
        ("left", lambda p: p[:, 1]),
    ]:
        d = _ks_statistic(stat(ours), stat(ref))
        assert d < 0.05, f"{name}: KS distance {d:.3f} vs torchvision"


def test_crop_fallback_is_torchvision_central_crop() -> None:
    # No box of area >= 0.99 with aspect ratio in (4, 5) fits a 32x32 image: always the fallback.
    ours = sample_crop_params(50, 32, 32, (0.99, 1.0), (4.0, 5.0), torch.Generator().manual_seed(1))
    ref = RandomResizedCrop.get_params(torch.empty(3, 32, 32), [0.99, 1.0], [4.0, 5.0])
    assert (ours == torch.tensor(ref)).all()


# ---------------------------------------------------------------- ops vs torchvision, fixed params

def test_resized_crop_and_flip_match_torchvision(images) -> None:
    n = len(images)
    x = images.float() / 255
    g = torch.Generator().manual_seed(2)
    crop = sample_crop_params(n, 32, 32, (0.08, 1.0), (3 / 4, 4 / 3), g)
    flip = torch.arange(n) % 2 == 0
    for size in (32, 24, 48):
        out = resized_crop(x, crop, flip, size)
        for k in range(n):
            i, j, h, w = crop[k].tolist()
            ref = TF.resized_crop(x[k], i, j, h, w, [size, size], antialias=True)
            ref = TF.horizontal_flip(ref) if flip[k] else ref
            if h <= size and w <= size:  # enlarging: torchvision's bilinear, exactly
                assert torch.allclose(out[k], ref, atol=TOL), (size, k, crop[k])
            else:  # shrinking: we don't antialias (documented departure); close, not equal
                assert (out[k] - ref).abs().mean() < 0.05


@pytest.mark.parametrize(("ours", "theirs", "lo", "hi"), [
    (adjust_brightness, TF.adjust_brightness, 0.0, 2.0),
    (adjust_contrast, TF.adjust_contrast, 0.0, 2.0),
    (adjust_saturation, TF.adjust_saturation, 0.0, 2.0),
    (adjust_hue, TF.adjust_hue, -0.5, 0.5),
])
def test_colour_op_matches_torchvision(images, ours, theirs, lo, hi) -> None:
    x = images.float() / 255
    factors = torch.linspace(lo, hi, len(x))  # a different fixed factor for every image
    out = ours(x, factors)
    for k in range(len(x)):
        ref = theirs(x[k], float(factors[k]))
        assert torch.allclose(out[k], ref, atol=TOL), (ours.__name__, float(factors[k]), (out[k] - ref).abs().max())


def test_grayscale_blur_solarize_match_torchvision(images) -> None:
    x = images.float() / 255
    assert torch.allclose(rgb_to_grayscale(x), TF.rgb_to_grayscale(x), atol=TOL)
    assert torch.equal(solarize(x), TF.solarize(x, 0.5))
    x = x[:24]
    sigma = torch.linspace(0.1, 2.0, len(x))
    for kernel in (3, 5):
        out = gaussian_blur(x, sigma, kernel)
        for k in range(len(x)):
            ref = TF.gaussian_blur(x[k], [kernel, kernel], [float(sigma[k])] * 2)
            assert torch.allclose(out[k], ref, atol=TOL)


def _torchvision_view(image_u8: torch.Tensor, p, k: int, size: int, kernel: int,
                      antialias: bool = True) -> torch.Tensor:
    """Sample ``k`` of one view, rebuilt with torchvision ops from the parameters it drew."""
    x = image_u8.float() / 255
    i, j, h, w = p.crop[k].tolist()
    x = TF.resized_crop(x, i, j, h, w, [size, size], antialias=antialias)
    if p.flip[k]:
        x = TF.horizontal_flip(x)
    if p.jitter[k]:
        ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for op in p.order[k].tolist():
            x = ops[op](x, float(p.factors[k, op]))
    if p.grayscale[k]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if p.blur[k]:
        x = TF.gaussian_blur(x, [kernel, kernel], [float(p.blur_sigma[k])] * 2)
    if p.solarize[k]:
        x = TF.solarize(x, 0.5)
    return TF.normalize(x, list(MEAN), list(STD))


@pytest.mark.parametrize("backend", ["torch", "numba"])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_two_views_equal_torchvision_composition(images, preset, backend) -> None:
    """The whole pipeline = torchvision's ops applied one image at a time with the same parameters
    (random per-sample order of the jitter ops included), with either backend."""
    images = images[:24]
    aug = TwoViewAugment(preset, size=32, seed=3, blur=True, backend=backend)  # blur on to cover it at 32 px
    v1, v2, (p1, p2) = aug(images, return_params=True)
    for view, p in ((v1, p1), (v2, p2)):
        if PRESETS[preset]["jitter_prob"] > 0:  # MAE's preset has no colour ops: crop and flip only
            assert p.jitter.any() and p.grayscale.any() and (p.order[:, 0] == 3).any()
        else:
            assert not (p.jitter.any() or p.grayscale.any() or p.blur.any() or p.solarize.any())
        for k in range(len(images)):
            ref = _torchvision_view(images[k], p, k, 32, aug.views[0].blur_kernel_size)
            assert torch.allclose(view[k], ref, atol=1e-4), (preset, k, (view[k] - ref).abs().max())


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here"))


@pytest.mark.parametrize("backend", ["torch", "numba", CUDA])
def test_local_crops_equal_torchvision_composition(images, backend) -> None:
    """DINO's multi-crop: every local crop of every sample is torchvision's ops with its own
    parameters, at the local size, with either backend (and the PyTorch ops on a GPU). Without
    antialias: local crops shrink (the documented departure of `resized_crop`)."""
    images = images[:16]
    device = "cuda" if backend == "cuda" else "cpu"
    aug = TwoViewAugment("dino", size=32, seed=4, blur=True, backend="torch" if backend == "cuda" else backend,
                         local_crops=3, local_size=24)
    v1, v2, local, params = aug(images.to(device), return_params=True)
    v1, v2, local = v1.cpu(), v2.cpu(), local.cpu()
    params = [type(p)(*(t.cpu() for t in vars(p).values())) for p in params]
    assert v1.shape == v2.shape == (16, 3, 32, 32) and local.shape == (3, 16, 3, 24, 24)
    assert local.dtype == torch.float32 and len(params) == 5
    kernel = aug.local_view.blur_kernel_size
    assert kernel == 3 and any(p.blur.any() for p in params[2:])  # the local blur is exercised
    for c in range(3):
        p = params[2 + c]
        for k in range(len(images)):
            ref = _torchvision_view(images[k], p, k, 24, kernel, antialias=False)
            assert torch.allclose(local[c, k], ref, atol=1e-4), (backend, c, k, (local[c, k] - ref).abs().max())


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_local_crops_leave_the_global_views_of_a_seed_unchanged(photos, backend) -> None:
    two = TwoViewAugment("dino", size=32, seed=8, backend=backend)(photos)
    with_local = TwoViewAugment("dino", size=32, seed=8, backend=backend, local_crops=2)(photos)
    assert len(two) == 2 and len(with_local) == 3
    assert torch.equal(two[0], with_local[0]) and torch.equal(two[1], with_local[1])
    assert with_local[2].shape == (2, len(photos), 3, 14, 14)  # local_crop_size(32): DINO's 96/224
    assert not torch.equal(with_local[2][0], with_local[2][1])  # each crop draws its own parameters


def test_local_crop_settings_follow_dino() -> None:
    aug = TwoViewAugment("dino", size=224, local_crops=6)
    g, local = aug.views[0], aug.local_view
    assert aug.local_size == 96 and g.crop_scale == (0.4, 1.0)
    assert local.crop_scale == (0.05, 0.4) and local.blur_prob == 0.5 and local.solarize_prob == 0.0
    assert local.jitter == g.jitter == (0.4, 0.4, 0.2, 0.1) and local.blur_kernel_size == 9
    assert (aug.views[0].blur_prob, aug.views[1].blur_prob, aug.views[1].solarize_prob) == (1.0, 0.1, 0.2)
    assert TwoViewAugment("dino", size=32, local_crops=2).local_view.blur_prob == 0.0  # CIFAR: no blur
    p = sample_view_params(20000, 224, 224, local, torch.Generator().manual_seed(0), torch.device("cpu"))
    area = (p.crop[:, 2] * p.crop[:, 3]).float() / 224 ** 2
    assert area.min() > 0.045 and area.max() < 0.41  # scale (0.05, 0.4), up to rounding
    assert _binomial_ok(p.blur, 0.5)
    with pytest.raises(DataError, match="local_crops"):
        TwoViewAugment("dino", 32, local_crops=-1)


# ---------------------------------------------------------------- rates

def _binomial_ok(hits: torch.Tensor, p: float) -> bool:
    n = hits.numel()
    return abs(float(hits.float().sum()) - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1e-9


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_rates_match_preset(preset) -> None:
    n = 20000
    v1, v2 = TwoViewAugment(preset, size=224).views  # 224: the paper resolution, blur on
    g = torch.Generator().manual_seed(4)
    for cfg in (v1, v2):
        p = sample_view_params(n, 32, 32, cfg, g, torch.device("cpu"))
        assert _binomial_ok(p.flip, cfg.flip_prob)
        assert _binomial_ok(p.grayscale, cfg.grayscale_prob)
        assert _binomial_ok(p.jitter, cfg.jitter_prob)
        assert _binomial_ok(p.blur, cfg.blur_prob)
        assert _binomial_ok(p.solarize, cfg.solarize_prob)
        b, c, s, h = cfg.jitter
        assert p.factors[:, 0].min() >= 1 - b and p.factors[:, 0].max() <= 1 + b
        assert p.factors[:, 3].abs().max() <= h and (h == 0 or p.factors[:, 3].abs().max() > 0.9 * h)
        assert p.blur_sigma.min() >= 0.1 and p.blur_sigma.max() <= 2.0
        # every one of the 24 jitter orders occurs about equally often
        counts = torch.unique(p.order, dim=0, return_counts=True)[1]
        assert len(counts) == 24
        assert counts.min() > n / 24 * 0.8


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_flip_and_grayscale_rates_in_the_pixels(photos, backend) -> None:
    """Rates seen in the output, not only in the parameters: each view is the photo, its mirror,
    its luma or the mirrored luma, in the preset's proportions."""
    batch = photos.repeat(20, 1, 1, 1)  # 960 images
    aug = TwoViewAugment("simclr", 32, seed=5, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_prob=0.0,
                         backend=backend)
    v1, _ = aug(batch)
    unit = v1 * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    plain = batch.float() / 255
    luma = TF.rgb_to_grayscale(plain, num_output_channels=3)

    def matches(ref: torch.Tensor) -> torch.Tensor:
        return torch.isclose(unit, ref, atol=1e-4).flatten(1).all(1)

    kinds = torch.stack([matches(plain), matches(plain.flip(-1)), matches(luma), matches(luma.flip(-1))], dim=1)
    assert (kinds.sum(1) == 1).all()  # every view is exactly one of the four
    flipped = kinds[:, 1] | kinds[:, 3]
    gray = kinds[:, 2] | kinds[:, 3]
    assert _binomial_ok(flipped, 0.5) and _binomial_ok(gray, 0.2)
    assert 0.3 < float(flipped[gray].float().mean()) < 0.7  # independent of each other


# ---------------------------------------------------------------- contract

@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_shapes_dtype_device_and_normalisation(photos, backend) -> None:
    for size in (32, 24, 48):
        v1, v2 = TwoViewAugment("byol", size=size, seed=0, backend=backend)(photos)
        for v in (v1, v2):
            assert v.shape == (len(photos), 3, size, size) and v.dtype == torch.float32
            assert v.device == photos.device and torch.isfinite(v).all()
    empty = TwoViewAugment("byol", size=32, seed=0, backend=backend)(photos[:0])
    assert empty[0].shape == (0, 3, 32, 32) and empty[1].shape == (0, 3, 32, 32)
    identity = TwoViewAugment("simclr", 32, seed=0, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.0,
                              jitter_prob=0.0, grayscale_prob=0.0, blur=False, solarize_prob=0.0, backend=backend)
    v1, v2 = identity(photos)
    expected = TF.normalize(photos.float() / 255, list(MEAN), list(STD))
    assert torch.allclose(normalize(photos), expected, atol=TOL)
    assert torch.allclose(v1, expected, atol=TOL) and torch.allclose(v2, expected, atol=TOL)


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_grayscale_input_becomes_three_channels(photos, backend) -> None:
    gray = photos[:, :1]
    v1, _ = TwoViewAugment("simclr", 32, seed=0, backend=backend)(gray)
    assert v1.shape == (len(photos), 3, 32, 32)
    unit = v1 * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    assert torch.allclose(unit[:, 0], unit[:, 1], atol=1e-5) and torch.allclose(unit[:, 1], unit[:, 2], atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_same_seed_same_views_and_calls_differ(photos, backend) -> None:
    a, b = TwoViewAugment("simclr", 32, seed=7, backend=backend), TwoViewAugment("simclr", 32, seed=7, backend=backend)
    first_a, first_b = a(photos), b(photos)
    assert torch.equal(first_a[0], first_b[0]) and torch.equal(first_a[1], first_b[1])
    second_a = a(photos)
    assert torch.equal(second_a[0], b(photos)[0])  # the streams stay in step
    assert not torch.allclose(first_a[0], second_a[0])  # successive calls differ
    assert not torch.allclose(first_a[0], first_a[1])  # the two views differ
    assert not torch.allclose(TwoViewAugment("simclr", 32, seed=8)(photos)[0], first_a[0])
    torch.manual_seed(0)
    c = TwoViewAugment("simclr", 32)(photos)[0]
    torch.manual_seed(0)
    assert torch.equal(c, TwoViewAugment("simclr", 32)(photos)[0])  # seed=None follows torch's global seed


@pytest.mark.parametrize(("preset", "size", "shape", "overrides"), [
    ("simclr", 32, (3, 32, 32), {}),
    ("moco_v2", 32, (3, 32, 32), {"blur": True}),
    ("byol", 32, (3, 32, 32), {"blur": True}),  # asymmetric blur and solarize
    ("byol", 48, (3, 40, 56), {}),  # non-square input, crops that shrink and enlarge, kernel 5
    ("simclr", 24, (1, 32, 32), {"blur_kernel_size": 7}),  # one-channel input, wide kernel
])
def test_numba_backend_equals_torch_backend(photos, preset, size, shape, overrides) -> None:
    """The CPU kernel applies the very parameters the PyTorch ops apply, with the same arithmetic:
    equal views for one seed (in normalised units, where 1e-4 is ~2e-5 of the [0, 1] range)."""
    c, h, w = shape
    images = TF.resize(photos, [h, w], antialias=True)[:, :c].contiguous()
    torch_views = TwoViewAugment(preset, size, seed=13, backend="torch", **overrides)(images, return_params=True)
    numba_views = TwoViewAugment(preset, size, seed=13, backend="numba", **overrides)(images, return_params=True)
    for a, b in zip(torch_views[:2], numba_views[:2]):
        assert a.shape == b.shape == (len(images), 3, size, size)
        assert (a - b).abs().max() < 1e-4
    assert torch.equal(torch_views[2][0].crop, numba_views[2][0].crop)  # one parameter stream for both
    torch.set_num_threads(2)  # rows split over two threads: same result as one
    try:
        threaded = TwoViewAugment(preset, size, seed=13, backend="numba", **overrides)(images.repeat(3, 1, 1, 1))
        torch.set_num_threads(1)
        single = TwoViewAugment(preset, size, seed=13, backend="numba", **overrides)(images.repeat(3, 1, 1, 1))
        assert torch.equal(threaded[0], single[0]) and torch.equal(threaded[1], single[1])
    finally:
        torch.set_num_threads(_THREADS)


_THREADS = torch.get_num_threads()


def test_each_sample_draws_its_own_parameters(photos) -> None:
    same = photos[:1].repeat(64, 1, 1, 1)
    v1, _, (p1, _) = TwoViewAugment("simclr", 32, seed=9)(same, return_params=True)
    assert len(torch.unique(p1.crop, dim=0)) > 48
    assert len(torch.unique(p1.factors[:, 0])) == 64
    assert 0 < int(p1.flip.sum()) < 64
    assert len(torch.unique(v1.flatten(1), dim=0)) == 64  # 64 copies of one image, 64 different views


def test_presets_differ_as_the_papers_say() -> None:
    simclr_cifar = TwoViewAugment("simclr", 32).views
    simclr_imagenet = TwoViewAugment("simclr", 224).views
    assert simclr_cifar[0].jitter == (0.4, 0.4, 0.4, 0.1) and simclr_cifar[0].blur_prob == 0.0  # B.9: s=0.5, no blur
    assert simclr_imagenet[0].jitter == (0.8, 0.8, 0.8, 0.2) and simclr_imagenet[0].blur_prob == 0.5
    assert simclr_imagenet[0].blur_kernel_size == 23 and simclr_imagenet[0].crop_scale == (0.08, 1.0)
    moco = TwoViewAugment("moco_v2", 224).views
    assert moco[0].crop_scale == (0.2, 1.0) and moco[0].jitter == (0.4, 0.4, 0.4, 0.1) and moco[0].blur_prob == 0.5
    byol = TwoViewAugment("byol", 224).views
    assert byol[0].jitter == (0.4, 0.4, 0.2, 0.1)
    assert (byol[0].blur_prob, byol[1].blur_prob) == (1.0, 0.1)
    assert (byol[0].solarize_prob, byol[1].solarize_prob) == (0.0, 0.2)
    byol_cifar = TwoViewAugment("byol", 32).views
    assert byol_cifar[0].blur_prob == 0.0 and byol_cifar[1].solarize_prob == 0.2  # CIFAR: no blur, solarize kept
    assert TwoViewAugment("byol", 32, blur=True).views[0].blur_prob == 1.0
    # overrides
    o = TwoViewAugment("simclr", 32, crop_scale=(0.2, 1.0), jitter_strength=1.0, blur_prob=(0.3, 0.7), blur=True).views
    assert o[0].crop_scale == (0.2, 1.0) and o[0].jitter == (0.8, 0.8, 0.8, 0.2)
    assert (o[0].blur_prob, o[1].blur_prob) == (0.3, 0.7)


def test_byol_views_are_asymmetric_in_the_pixels(photos) -> None:
    batch = photos.repeat(8, 1, 1, 1)  # 384 images
    aug = TwoViewAugment("byol", 32, seed=11, blur=True, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.0)
    v1, v2, (p1, p2) = aug(batch, return_params=True)
    assert p1.blur.all() and not p1.solarize.any()
    assert 0 < int(p2.blur.sum()) < len(batch) * 0.2 and 0 < int(p2.solarize.sum()) < len(batch) * 0.35
    # view 1 is always blurred: less high-frequency energy than the sharp view-2 samples
    def roughness(v: torch.Tensor) -> torch.Tensor:
        return (v[..., 1:] - v[..., :-1]).abs().mean(dim=(1, 2, 3))
    sharp = ~p2.blur & ~p2.solarize
    assert roughness(v1).mean() < 0.8 * roughness(v2[sharp]).mean()


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(preset="swav"), "preset 'swav' is unknown"),
    (dict(crop_size=3), "crop_size"),
    (dict(crop_scale=(0.5, 0.1)), "crop_scale"),
    (dict(flip_prob=1.5), "flip_prob"),
    (dict(blur_prob=(0.1, 0.2, 0.3)), "blur_prob"),
    (dict(blur_kernel_size=4), "blur_kernel_size"),
    (dict(backend="opencv"), "backend 'opencv' is unknown"),
])
def test_bad_settings_name_the_setting(kwargs, match) -> None:
    with pytest.raises(DataError, match=match):
        TwoViewAugment(**kwargs)


def test_bad_input_is_refused(photos) -> None:
    aug = TwoViewAugment("simclr", 32, seed=0)
    with pytest.raises(DataError, match="uint8"):
        aug(photos.float())
    with pytest.raises(DataError, match="C 1 or 3"):
        aug(torch.zeros(2, 4, 32, 32, dtype=torch.uint8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_runs_on_cuda_like_on_cpu(photos) -> None:
    gpu = photos.cuda()
    v1, v2, (p1, _) = TwoViewAugment("byol", 32, seed=0, blur=True)(gpu, return_params=True)
    assert v1.is_cuda and v2.is_cuda and p1.crop.is_cuda
    assert torch.equal(v1, TwoViewAugment("byol", 32, seed=0, blur=True)(gpu)[0])
    for k in range(len(photos)):  # CUDA arithmetic, same torchvision reference
        ref = _torchvision_view(photos[k], type(p1)(*(t.cpu() for t in vars(p1).values())), k, 32, 3)
        assert torch.allclose(v1[k].cpu(), ref, atol=1e-4)


# ---------------------------------------------------------------- the sync-free (GPU) op sequence

@pytest.mark.parametrize("preset", ["simclr", "byol", "dino"])
def test_sync_free_ops_equal_the_row_selecting_ops(photos, preset) -> None:
    """The GPU's op sequence (masks + `where`) gives exactly the CPU's (ops on selected rows): the
    same seed, the same parameters, the same float32 pixels, local crops included."""
    kwargs = dict(seed=5, backend="torch", blur=True, local_crops=2 if preset == "dino" else 0)
    rows = TwoViewAugment(preset, 32, sync_free=False, **kwargs)(photos)
    masks = TwoViewAugment(preset, 32, sync_free=True, **kwargs)(photos)
    for a, b in zip(rows, masks):
        assert torch.equal(a, b)


def _top_level_ops(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::")]


def test_sync_free_call_has_a_fixed_bounded_op_sequence_without_host_syncs(photos) -> None:
    """One call of the GPU path, profiled on CPU: none of the ops that wait for the device
    (nonzero, item, boolean indexing), at most ~1,000 ops (views included), and the same sequence
    whatever the batch size or the draws, which is what lets one batch shape replay as a CUDA graph."""
    aug = TwoViewAugment("byol", 32, seed=1, backend="torch", sync_free=True, blur=True)
    aug(photos[:16])  # first call: generator and constants made
    ops = _top_level_ops(lambda: aug(photos[:16]))
    syncing = {"aten::nonzero", "aten::item", "aten::_local_scalar_dense", "aten::index", "aten::index_put_",
               "aten::masked_select", "aten::is_nonzero"}
    assert not syncing & set(ops), sorted(syncing & set(ops))
    assert 300 < len(ops) <= 1050, len(ops)  # 1,009 on torch 2.14; the row-selecting path: 1,047 + 14 nonzero
    again = TwoViewAugment("byol", 32, seed=99, backend="torch", sync_free=True, blur=True)
    again(photos[:48])
    assert _top_level_ops(lambda: again(photos[:48])) == ops
    rows = TwoViewAugment("byol", 32, seed=1, backend="torch", sync_free=False, blur=True)
    rows(photos[:16])
    assert "aten::nonzero" in _top_level_ops(lambda: rows(photos[:16]))  # the probe does see a sync op


def test_sync_free_view_traces_as_one_graph(photos) -> None:
    """Dynamo traces a whole view without a graph break (`fullgraph=True`), so `compile=True`
    fuses it; the traced graph (run eagerly here) gives the eager values."""
    from pipelines.augment import _normalized_view

    aug = TwoViewAugment("byol", 32, seed=2, blur=True)
    config = aug.views[1]
    p = sample_view_params(16, 32, 32, config, torch.Generator().manual_seed(0), torch.device("cpu"))
    x = photos[:16].float() / 255
    args = (x, p.crop, p.flip, p.jitter, p.factors, p.order, p.grayscale, p.blur, p.blur_sigma, p.solarize,
            32, config.blur_kernel_size)
    torch._dynamo.reset()
    traced = torch.compile(_normalized_view, fullgraph=True, dynamic=False, backend="eager")
    assert torch.allclose(traced(*args), _normalized_view(*args), atol=1e-6)


def test_compile_setting_is_checked() -> None:
    with pytest.raises(DataError, match="compile='yes'"):
        TwoViewAugment("simclr", 32, compile="yes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_augmentation_never_waits_for_the_device(photos, compile) -> None:
    """`torch.cuda.set_sync_debug_mode("error")` raises on any op that syncs with the host; a call
    after warm-up (generator, constants, compile) runs under it, and gives the eager values."""
    gpu = photos.cuda()
    aug = TwoViewAugment("byol", 32, seed=0, blur=True, compile=compile, local_crops=2)
    for _ in range(3):
        aug(gpu)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        views = aug(gpu)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    eager = TwoViewAugment("byol", 32, seed=0, blur=True, local_crops=2)
    for _ in range(3):
        eager(gpu)
    for a, b in zip(views, eager(gpu)):
        assert torch.allclose(a, b, atol=1e-4)
