"""Views cut from whole photos (issue 23): crop boxes drawn against each photo's own size, cut at full
resolution (or a reduced-scale JPEG decode that still covers the view), equal to torchvision."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import decode_jpeg
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from pipelines.augment import TwoViewAugment, sample_crop_boxes
from pipelines.decode import cut_views, decode_and_augment, reduced_scale


def _photo(height: int, width: int, seed: int = 0, quality: int = 95) -> bytes:
    """A photo-like JPEG: smooth colour fields (upsampled noise) plus a little grain."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((max(2, height // 24), max(2, width // 24), 3)) * 255).astype(np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    grain = rng.normal(0, 4, smooth.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.mark.parametrize("height,width", [(300, 400), (360, 640)])  # 4:3 and 16:9
def test_crop_boxes_cover_the_whole_photo(height, width) -> None:
    """Over many draws every pixel of the photo is in some view (a shorter-side centre crop first
    left 25 % of a 4:3 and 44 % of a 16:9 photo out of every view)."""
    aug = TwoViewAugment("simclr", size=224, seed=0)
    # The edge columns of a 16:9 photo need a box flush with them: about 1 box in 200 is.
    n = 20_000
    boxes = torch.cat(aug.crop_boxes(torch.full((n,), height), torch.full((n,), width))).numpy()
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (h > 0).all() and (w > 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    marks = np.zeros((height + 1, width + 1), np.int64)  # 2-D difference array of the boxes
    np.add.at(marks, (top, left), 1)
    np.add.at(marks, (top + h, left), -1)
    np.add.at(marks, (top, left + w), -1)
    np.add.at(marks, (top + h, left + w), 1)
    covered = marks.cumsum(0).cumsum(1)[:height, :width] > 0
    assert covered.all()


def test_crop_boxes_follow_torchvision_get_params() -> None:
    """Per-image sizes in one call; the same box-size distribution as torchvision's get_params, and
    its central fallback when no attempt fits."""
    g = torch.Generator().manual_seed(0)
    heights, widths = torch.tensor([300, 360] * 2000), torch.tensor([400, 640] * 2000)
    boxes = sample_crop_boxes(heights, widths, (0.08, 1.0), (3 / 4, 4 / 3), g)
    ours = (boxes[:, 2] * boxes[:, 3]).double() / (heights * widths).double()
    torch.manual_seed(0)
    img = torch.zeros(3, 300, 400)
    ref = torch.tensor([h * w / (300 * 400) for _, _, h, w in
                        (RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(2000))])
    assert abs(ours[::2].mean().item() - ref.mean().item()) < 0.03  # means of ~0.52, sd ~0.27 / sqrt(2000)
    assert (boxes[1::2, 0] + boxes[1::2, 2] <= 360).all() and (boxes[1::2, 1] + boxes[1::2, 3] <= 640).all()
    # no attempt fits a 1:10 strip with scale ~1 and ratio 3/4..4/3: torchvision's centre crop
    strip = sample_crop_boxes(torch.tensor([100]), torch.tensor([1000]), (0.99, 1.0), (3 / 4, 4 / 3), g)
    assert strip.tolist() == [[0, 433, 100, 133]]  # width round(100 * 4/3), centred


@pytest.mark.parametrize("box,side", [
    ((10, 20, 250, 300), 224),   # near full size: decoded at full scale
    ((0, 0, 480, 600), 224),     # 2x the side: decoded at 1/2
    ((40, 100, 300, 330), 64),   # 4x: decoded at 1/4
    ((5, 7, 470, 630), 32),      # 8x+: decoded at 1/8
    ((200, 300, 40, 50), 224),   # a small box enlarged
])
def test_a_view_equals_torchvision_resized_crop(box, side) -> None:
    data = _photo(480, 640, seed=1)
    full = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    top, left, h, w = box
    ref = TF.resized_crop(full, top, left, h, w, [side, side], antialias=True).float()
    (view,) = cut_views(data, [box], [side])
    diff = (torch.from_numpy(view.copy()).float() - ref).abs()
    assert view.shape == (3, side, side)
    assert diff.mean().item() < 2.0 and torch.quantile(diff.flatten(), 0.99).item() < 12, \
        (reduced_scale([box], [side]), diff.mean().item())


def test_reduced_scale_keeps_every_box_at_least_its_side() -> None:
    assert reduced_scale([(0, 0, 480, 600)], [224]) == 2
    assert reduced_scale([(0, 0, 480, 600), (0, 0, 100, 100)], [224, 96]) == 1
    assert reduced_scale([(0, 0, 300, 330)], [64]) == 4
    assert reduced_scale([(0, 0, 470, 630)], [32]) == 8
    assert reduced_scale([(0, 0, 223, 600)], [224]) == 1


def test_mixed_size_photos_give_seeded_views_on_any_thread_count() -> None:
    photos = [_photo(h, w, seed=k) for k, (h, w) in enumerate([(300, 400), (360, 640), (640, 480), (500, 500)] * 3)]
    photos.append(_png := _png_photo())

    def views(threads: int) -> list[torch.Tensor]:
        aug = TwoViewAugment("byol", size=64, seed=5, local_crops=0)
        return [v for _ in range(2) for v in decode_and_augment(photos, aug, threads=threads)]

    one, two = views(1), views(2)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    assert one[0].shape == (len(photos), 3, 64, 64) and not torch.equal(one[0], one[1])
    assert not torch.equal(one[0], one[2])  # the second call draws new views
    dino = decode_and_augment(photos, TwoViewAugment("dino", size=64, seed=0, local_crops=2), image_size=48)
    assert dino[0].shape == (len(photos), 3, 64, 64) and dino[2].shape == (2, len(photos), 3, 27, 27)
    assert all(torch.isfinite(v).all() for v in dino)


def _png_photo() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(9).integers(0, 256, (200, 260), dtype=np.uint8), "L").save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("height,width,size,resize", [(300, 400, 224, None), (360, 640, 64, None),
                                                      (640, 480, 32, 40), (28, 28, 32, None)])
def test_eval_transform_matches_torchvision_resize_and_center_crop(height, width, size, resize) -> None:
    from torchvision.transforms import v2

    from pipelines.images import decode_batch, eval_resize, eval_transform

    data = _photo(height, width, seed=3)
    full = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    ref = v2.Compose([v2.Resize(eval_resize(size, resize), antialias=True), v2.CenterCrop(size)])(full)
    assert torch.equal(eval_transform(full[None], size, resize)[0], ref)
    assert torch.equal(decode_batch([data], size, resize=resize)[0], ref)  # what kNN, evaluate and embed decode
    assert eval_resize(224) == 256 and eval_resize(32) == 37


def test_images_at_the_training_size_are_used_whole() -> None:
    """CIFAR at 32 px (the demo at 28): no resize, no crop, as before the evaluation transform."""
    from pipelines.images import decode_batch

    data = _photo(32, 32, seed=4)
    full = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    assert torch.equal(decode_batch([data], 32)[0], full)


def test_grey_and_broken_photos() -> None:
    from pipelines.errors import DataError

    buf = io.BytesIO()
    Image.fromarray(np.full((300, 500), 90, np.uint8), "L").save(buf, format="JPEG")
    (view,) = cut_views(buf.getvalue(), [(0, 0, 300, 300)], [64])
    assert view.shape == (3, 64, 64) and abs(int(view.mean()) - 90) <= 1 and (view[0] == view[2]).all()
    broken = _photo(300, 400)[:2000]  # truncated mid-scan
    with pytest.raises(DataError, match="cannot decode image"):
        decode_and_augment([broken, _photo(200, 300)], TwoViewAugment("simclr", size=32, seed=0))


def _photo_column(count: int) -> np.ndarray:
    column = np.empty(count, dtype=object)
    column[:] = [_photo(h, w, seed=k) for k, (h, w) in enumerate([(120, 160), (90, 160), (160, 120)] * (count // 3))]
    return column


def test_both_loaders_take_encoded_photo_batches() -> None:
    """The stream loader's Ray Data functions (header check, `augment_on=data`) and the memory
    loader's `EncodedSplit`: views cut from the whole photos, over-size photos named and refused."""
    from pipelines.errors import DataError
    from pipelines.memory import EncodedSplit, MemoryBatches
    from pipelines.stream import _augment_batch, _keep_encoded, decoded_once

    assert decoded_once([32, 32], 32) and decoded_once([32, 32], None)
    assert not decoded_once(None, 32) and not decoded_once([28, 28], 32)  # mixed sizes; the demo trained at 32
    assert decoded_once([120, 160], None)  # one size, no training size: decoded whole, the augmenter crops it
    column = _photo_column(6)
    batch = {"image": column, "label": np.arange(6), "path": np.array([f"p{k}.jpg" for k in range(6)])}
    kept = _keep_encoded(batch, keep_path=False)
    assert "path" not in kept and kept["image"] is column and kept["label"].dtype == np.int64
    with pytest.raises(DataError, match=r"p0\.jpg: 160x120 = 19,200 pixels, more than data.max_image_pixels"):
        _keep_encoded(batch, max_pixels=10_000)
    views = _augment_batch(kept, "simclr", 32)
    assert views["view1"].shape == (6, 3, 32, 32) and views["view2"].shape == (6, 3, 32, 32)
    memory = MemoryBatches(EncodedSplit(list(column), np.arange(6)))
    got = list(memory.epoch(np.array([5, 0, 3, 1, 2, 4]), batch_size=3, augment=TwoViewAugment("byol", 32, seed=0)))
    assert len(got) == 2 and all(v.shape == (3, 3, 32, 32) for pair in got for v in pair)
    # the same rows, the same seed: the same views as decode_and_augment of those photos
    again = decode_and_augment(list(column[[5, 0, 3]]), TwoViewAugment("byol", 32, seed=0))
    assert torch.equal(got[0][0], again[0]) and torch.equal(got[0][1], again[1])


@pytest.mark.parametrize("size", [96, 224])  # kernels of 9 and 23 taps: the row-wise passes' padding
def test_numba_blur_at_photo_size_equals_torchvision(size) -> None:
    from pipelines.augment import MEAN, STD

    x = torch.from_numpy(np.stack([np.asarray(Image.open(io.BytesIO(_photo(size, size, seed=k))))
                                   for k in range(4)])).permute(0, 3, 1, 2).contiguous()
    aug = TwoViewAugment("simclr", size=size, seed=0, backend="numba", crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
                         flip_prob=0.0, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=1.0)
    v1, _, (p1, _) = aug(x, return_params=True)
    kernel = aug.views[0].blur_kernel_size
    assert kernel == 2 * ((size // 10) // 2) + 1 and p1.blur.all()
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    for k in range(len(x)):
        sigma = float(p1.blur_sigma[k])
        ref = TF.gaussian_blur(x[k].float() / 255, [kernel, kernel], [sigma, sigma])
        assert torch.allclose(v1[k] * std + mean, ref, atol=1e-5), (k, sigma)
