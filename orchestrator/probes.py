"""How an encoder is measured: the weighted kNN probe and the linear probe on frozen features.

The one evaluation protocol of pretraining (rank 0 after each epoch: `KnnProbe`) and of
`selfsup evaluate` (`probe_metrics` on the features it extracts). The metric math itself is
`methods.evaluate` (`knn_accuracy`, `linear_probe`).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from orchestrator.config import Config, EvalConfig
from orchestrator.training import autocast


# --- the probes a run measures its encoder with ----------------------------------------------------------------------------------

class KnnProbe:
    """Weighted kNN top-1/top-5 (InstDisc, Wu et al. 2018) of an encoder, on fixed images; optionally
    the linear probe on the same features.

    Bank: a seeded per-class subset of `eval.knn_train_limit` training images; queries: the test
    split (or such a subset of `eval.knn_test_limit`), as `orchestrator.data.decode_knn` decodes
    them. Images are resized to `data.image_size` and normalised; no augmentation.

    Linear probe (the linear evaluation protocol, as solo-learn's and lightly's benchmarks report
    it, on frozen features): `methods.evaluate.linear_probe` trained for `eval.linear_epochs` on the
    bank's features (at most `eval.linear_train_limit` of them, a seeded random subset), scored on
    the queries. It reuses the features the kNN probe just extracted: its cost is the classifier's
    training alone (the demo: about a second on one core).
    """

    def __init__(self, cfg: Config, device: torch.device, decoded: dict[str, Any] | None = None) -> None:
        """`decoded`: the driver's decoded data (`orchestrator.data`, with "bank" and "test"); else decode here."""
        from orchestrator.data import decode_knn

        self.cfg, self.device = cfg, device
        knn = decoded if decoded is not None else decode_knn(cfg)
        self.bank_x, self.bank_y = _labelled(*knn["bank"].tensors())
        self.test_x, self.test_y = _labelled(*knn["test"].tensors())
        if device.type == "cuda":  # uint8 images kept on the GPU: one copy, not one per evaluation
            self.bank_x, self.test_x = self.bank_x.to(device), self.test_x.to(device)

    @torch.no_grad()
    def features(self, encoder: nn.Module, images_uint8: torch.Tensor) -> torch.Tensor:
        """Encoder features [N, D] of the images, float32, left on the probe's device (the kNN runs there)."""
        from pipelines.augment import normalize

        out = []
        cuda = self.device.type == "cuda"
        batch = self.cfg.eval.batch_size
        step = 4 * batch  # normalise in chunks: a float copy of 50k images is 600 MB
        for i in range(0, len(images_uint8), step):
            x = normalize(images_uint8[i:i + step].to(self.device, non_blocking=True))
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(self.device):
                out += [encoder(x[j:j + batch]).float() for j in range(0, len(x), batch)]
        return torch.cat(out)

    def __call__(self, encoder: nn.Module, *, linear: bool = False) -> dict[str, float]:
        """`probe_metrics` of the encoder's features: kNN, and with `linear` the linear probe."""
        was_training = encoder.training
        encoder.eval()
        try:
            bank = self.features(encoder, self.bank_x)
            test = self.features(encoder, self.test_x)
        finally:
            encoder.train(was_training)
        return probe_metrics(bank, self.bank_y, test, self.test_y, self.cfg.eval, seed=self.cfg.run.seed,
                             linear=linear)


def probe_metrics(bank: torch.Tensor, bank_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                  e: EvalConfig, *, seed: int, linear: bool = True) -> dict[str, float]:
    """The evaluation protocol of pretraining and `selfsup evaluate`, on extracted features.

    Args:
        bank, bank_labels: the memory bank's features [N, D] and labels; also the linear probe's
            training set (at most `e.linear_train_limit` of them, a subset seeded by `seed`).
        test, test_labels: the queries / the linear probe's test set.
        e: an `EvalConfig` (k, T, linear probe epochs, lr, limit).
        linear: also run the linear probe (when `e.linear_epochs` > 0).

    Returns:
        {"knn_top1", "knn_top5"} and maybe {"linear_top1", "linear_top5", "linear_train_top1",
        "linear_seconds"}; {} when any image is unlabelled (label -1).
    """
    from methods.evaluate import knn_accuracy, linear_probe

    if not (bool((bank_labels >= 0).all()) and bool((test_labels >= 0).all())):
        return {}  # unlabelled images (-1): nothing to score; the driver says so (pretrain._finish)
    # On a GPU the similarities are bf16 matmuls (the features are normalised: |s| <= 1, bf16's
    # 3 significant digits rank the neighbours as float32 does but for near-ties); float32 on CPU.
    matmul_dtype = torch.bfloat16 if bank.is_cuda else None
    r = knn_accuracy(bank, bank_labels, test, test_labels, k=e.knn_k, temperature=e.knn_t, matmul_dtype=matmul_dtype)
    out = {"knn_top1": float(r["top1"]), "knn_top5": float(r["top5"])}
    if not (linear and e.linear_epochs > 0):
        return out
    bank, test = bank.cpu(), test.cpu()  # the linear probe's classifier trains on the CPU, as before
    if e.linear_train_limit is not None and len(bank) > e.linear_train_limit:
        keep = torch.randperm(len(bank), generator=torch.Generator().manual_seed(seed))[:e.linear_train_limit]
        bank, bank_labels = bank[keep], bank_labels[keep]
    start = time.perf_counter()
    lin = linear_probe(bank, bank_labels, test, test_labels, epochs=e.linear_epochs, lr=e.linear_lr, seed=seed)
    out.update(linear_top1=float(lin["top1"]), linear_top5=float(lin["top5"]),
               linear_train_top1=float(lin["train_top1"]), linear_seconds=time.perf_counter() - start)
    return out


def _labelled(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows with a label (an ImageFolder can mix class folders with loose images, label -1)."""
    keep = labels >= 0
    return (images, labels) if bool(keep.all()) else (images[keep], labels[keep])


def worker_label_metrics(config: dict[str, Any]) -> bool:
    """Whether this run computes label-based metrics (kNN, a linear probe): the driver's
    `orchestrator.data.check_data` turns them off for a dataset without labels."""
    return bool(config.get("_label_metrics", True))
