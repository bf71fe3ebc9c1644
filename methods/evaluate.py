"""Evaluation of frozen encoders: weighted kNN and a linear probe, plus feature extraction."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def extract_features(encoder: nn.Module, images: Tensor, batch_size: int = 512,
                     device: torch.device | str | None = None) -> Tensor:
    """Encoder features of `images` in eval mode, without gradients.

    Args:
        encoder: any module mapping [B, 3, H, W] to [B, D]; its train/eval mode is restored after.
        images: float [N, 3, H, W], normalised like the training views.
        batch_size: images per forward.
        device: where to run; default the encoder's parameters' device.

    Returns:
        float32 [N, D] on the CPU.
    """
    if device is None:
        param = next(encoder.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    was_training = encoder.training
    encoder.eval()
    try:
        out = [encoder(images[i:i + batch_size].to(device)).float().cpu()
               for i in range(0, images.size(0), batch_size)]
    finally:
        encoder.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 0)


@torch.no_grad()
def knn_accuracy(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor,
                 k: int = 200, temperature: float = 0.1, chunk_size: int = 1024,
                 matmul_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Weighted k-nearest-neighbour accuracy (Wu et al. 2018, InstDisc, sec. 3.4; lightly benchmarks).

    Each test feature votes with its k most cosine-similar train features, neighbour i weighing
    exp(s_i / T) for its class; the classes are ranked by total weight.

    Args:
        train_feats: [N, D] memory bank. train_labels: [N] ints in [0, C).
        test_feats: [M, D]. test_labels: [M].
        k: neighbours, clipped to N. temperature: T.
        chunk_size: test rows per similarity block (memory stays O(chunk_size * N)).
        matmul_dtype: the similarities' matmul dtype (e.g. torch.bfloat16 on a GPU); None: float32.

    Returns:
        {"top1": fraction in [0, 1], "top5": fraction in [0, 1]} (top5 is over min(5, C) classes).
    """
    bank = F.normalize(train_feats.float(), dim=1)
    bank_mm = bank if matmul_dtype is None else bank.to(matmul_dtype)
    train_labels = train_labels.long().to(bank.device)
    test_labels = test_labels.long()
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, bank.size(0))
    top = min(5, num_classes)
    hits1 = hits5 = 0
    for i in range(0, test_feats.size(0), chunk_size):
        q = F.normalize(test_feats[i:i + chunk_size].float().to(bank.device), dim=1)
        sim, idx = (q.to(bank_mm.dtype) @ bank_mm.T).float().topk(k, dim=1)  # [c, k]
        weights = (sim / temperature).exp()
        votes = torch.zeros(q.size(0), num_classes, device=bank.device)
        votes.scatter_add_(1, train_labels[idx], weights)  # [c, C]
        ranked = votes.topk(top, dim=1).indices.cpu()
        labels = test_labels[i:i + chunk_size].unsqueeze(1)
        hits1 += int((ranked[:, :1] == labels).sum())
        hits5 += int((ranked == labels).any(dim=1).sum())
    m = max(test_feats.size(0), 1)
    return {"top1": hits1 / m, "top5": hits5 / m}


def linear_probe(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor,
                 *, epochs: int = 100, lr: float = 1e-3, batch_size: int = 256,
                 weight_decay: float = 0.0, seed: int = 0) -> dict[str, float]:
    """Linear classifier on frozen, standardised features (the linear evaluation protocol).

    Departure from SimCLR's protocol (SGD/LARS on augmented images for 90 epochs): features are
    extracted once without augmentation and standardised with the train mean/std, and the
    classifier is trained with Adam from zero weights; deterministic for a given seed.

    Args:
        train_feats: [N, D]; train_labels: [N]; test_feats: [M, D]; test_labels: [M].
        epochs, lr, batch_size, weight_decay: Adam training of the linear layer.
        seed: seeds the minibatch order.

    Returns:
        {"top1", "top5": test accuracy (top5 over min(5, C) classes), "train_top1": train
        accuracy}, fractions in [0, 1].
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny steps: one thread is fastest, and immune to
    try:  # OpenMP spin-waiting when other processes load the cores (11 s vs 0.2 s seen here)
        return _fit_linear(train_feats, train_labels, test_feats, test_labels, epochs=epochs,
                           lr=lr, batch_size=batch_size, weight_decay=weight_decay, seed=seed)
    finally:
        torch.set_num_threads(threads)


def _fit_linear(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor,
                *, epochs: int, lr: float, batch_size: int, weight_decay: float,
                seed: int) -> dict[str, float]:
    x_train, x_test = train_feats.float(), test_feats.float()
    y_train, y_test = train_labels.long(), test_labels.long()
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    clf = nn.Linear(x_train.size(1), num_classes)
    nn.init.zeros_(clf.weight)
    nn.init.zeros_(clf.bias)
    opt = torch.optim.Adam(clf.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(x_train.size(0), generator=gen).split(batch_size):
            loss = F.cross_entropy(clf(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        ranked = clf(x_test).topk(min(5, num_classes), dim=1).indices
        test_top1 = (ranked[:, 0] == y_test).float().mean().item()
        test_top5 = (ranked == y_test.unsqueeze(1)).any(dim=1).float().mean().item()
        train_top1 = (clf(x_train).argmax(1) == y_train).float().mean().item()
    return {"top1": test_top1, "top5": test_top5, "train_top1": train_top1}


def fine_tune(encoder: nn.Module, train_images: Tensor, train_labels: Tensor, test_images: Tensor,
              test_labels: Tensor, *, epochs: int, lr: float = 1e-4, weight_decay: float = 0.05,
              batch_size: int = 128, seed: int = 0, device: torch.device | None = None) -> dict[str, float]:
    """End-to-end fine-tuning, the protocol MAE is judged by (He et al. 2022, sec. 4): a COPY of the
    encoder + a linear head on its pooled features, trained together on the labelled images, then
    scored on the test images. The encoder passed in is left as it was.

    As MAE's `main_finetune.py`: AdamW, a per-step cosine LR after a one-epoch linear warm-up,
    random crops (scale 0.08-1, resized back) and flips. Departures: no layer-wise LR decay, mixup,
    cutmix, label smoothing or drop path (their settings depend on the model size; this is the
    plain protocol); the head sees the encoder's own pooled features (a timm ViT's class token),
    not MAE's global average pool.

    Args:
        encoder: maps float [B, 3, H, W] (normalised) to [B, D].
        train_images, test_images: normalised float [N, 3, H, W] (H, W a size the encoder takes).
        train_labels, test_labels: [N] class indices.
        epochs: passes over the training images (>= 1).
        lr, weight_decay, batch_size: AdamW's, for the encoder and head alike.
        seed: seeds the head, the batch order and the augmentation.
        device: where to train (default: the encoder's parameters' device).

    Returns:
        {"top1", "top5", "train_top1"} fractions in [0, 1] (top5 over min(5, C) classes).
    """
    import copy

    from methods.schedules import warmup_cosine
    from pipelines.augment import sample_crop_params

    if epochs < 1:
        raise ValueError(f"fine_tune: epochs must be >= 1, got {epochs}")
    first = next(iter(encoder.parameters()), None)
    device = device or (first.device if first is not None else torch.device("cpu"))
    model = copy.deepcopy(encoder).to(device)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    with torch.no_grad():
        dim = model(train_images[:2].to(device)).shape[1]
    head = nn.Linear(dim, num_classes).to(device)
    nn.init.trunc_normal_(head.weight, std=2e-5)  # main_finetune.py: trunc_normal_(std=2e-5), zero bias
    nn.init.zeros_(head.bias)
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=lr, weight_decay=weight_decay)
    n, (h, w) = train_images.size(0), train_images.shape[-2:]
    steps_per_epoch = max(1, -(-n // batch_size))
    total, warmup = epochs * steps_per_epoch, steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total, warmup, 1.0))
    _set_mode(model, True)
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            x = train_images[idx]
            boxes = sample_crop_params(len(idx), h, w, (0.08, 1.0), (3 / 4, 4 / 3), gen, torch.device("cpu"))
            x = _crop_and_flip(x, boxes, torch.rand(len(idx), generator=gen) < 0.5).to(device)
            loss = F.cross_entropy(head(model(x)), train_labels[idx].long().to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    _set_mode(model, False)

    @torch.no_grad()
    def logits(images: Tensor) -> Tensor:
        return torch.cat([head(model(images[i:i + batch_size].to(device))).float().cpu()
                          for i in range(0, images.size(0), batch_size)])

    ranked = logits(test_images).topk(min(5, num_classes), dim=1).indices
    y_test = test_labels.long()
    return {"top1": (ranked[:, 0] == y_test).float().mean().item(),
            "top5": (ranked == y_test.unsqueeze(1)).any(dim=1).float().mean().item(),
            "train_top1": (logits(train_images).argmax(1) == train_labels.long()).float().mean().item()}


def _set_mode(module: nn.Module, training: bool) -> None:
    """train()/eval(), except on a torch.export program, whose mode is fixed when it is exported."""
    try:
        module.train(training)
    except (NotImplementedError, RuntimeError):
        pass


def _crop_and_flip(images: Tensor, boxes: Tensor, flip: Tensor) -> Tensor:
    """Each image's box (y0, x0, h, w) resized back to the image's size, then flipped where `flip`."""
    h, w = images.shape[-2:]
    out = torch.empty_like(images)
    for i, (y0, x0, bh, bw) in enumerate(boxes.tolist()):
        crop = images[i:i + 1, :, y0:y0 + bh, x0:x0 + bw]
        out[i] = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0]
    out[flip] = out[flip].flip(-1)
    return out
