"""Two gloo processes: DDP + gathered NT-Xent, SimSiam, Barlow Twins, VICReg, DINO, SwAV (Sinkhorn over
the global batch) and MAE each equal one process on the whole batch; MoCo's queue receives every rank's keys. No Ray: torch.multiprocessing
and a TCP rendezvous on 127.0.0.1."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import methods.mae
from methods_ddp_worker import (N, NEW_METHODS, UNGATHERED, WORLD, _bn_data, _data, _moco, _port, _simclr,
                                _worker, global_masking, method_inputs, new_method)

pytestmark = pytest.mark.slow  # two gloo processes (a process group), not the fast tier


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten() for _, g in sorted(grads.items())])


@pytest.mark.timeout(180)
def test_ddp_gathered_nt_xent_gradients_equal_single_process(ranks: list[dict[str, Any]]) -> None:
    x1, x2 = _data()
    model = _simclr()
    loss = model(x1, x2)["loss"]  # one process, the concatenated batch, plain BatchNorm
    loss.backward()
    reference = _flat({k: p.grad for k, p in model.named_parameters()})

    assert sum(r["loss"] for r in ranks) / WORLD == pytest.approx(loss.item(), rel=1e-10)
    for r in ranks:
        torch.testing.assert_close(_flat(r["grads"]), reference, rtol=1e-8, atol=1e-10)
    # The same comparison catches a gather whose backward divides by the world size.
    divided = _flat(ranks[0]["grads_divided"])
    assert (divided - reference).norm() / reference.norm() > 1e-2


@pytest.mark.timeout(180)
def test_moco_queue_holds_every_ranks_keys(ranks: list[dict[str, Any]]) -> None:
    _, x2 = _data()
    moco = _moco()
    with torch.no_grad():
        keys = F.normalize(moco.projector_momentum(moco.encoder_momentum(x2)), dim=1)  # [N, d]
    for r in ranks:
        assert r["ptr"] == N
        torch.testing.assert_close(r["queue"][:N], keys)  # rank 0's keys, then rank 1's, in order
        torch.testing.assert_close(r["queue"][N:], r["queue_before"][N:])
    torch.testing.assert_close(ranks[0]["queue"], ranks[1]["queue"])


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", sorted(NEW_METHODS))
def test_ddp_gradients_of_new_methods_equal_single_process(ranks: list[dict[str, Any]], name: str) -> None:
    # One process, the concatenated batch, plain BatchNorm: the global batch that GlobalBatchNorm
    # and the gathered losses reconstruct across the two ranks.
    model = new_method(name)
    original = methods.mae.random_masking
    methods.mae.random_masking = global_masking()  # type: ignore[assignment]
    try:
        out = model(*method_inputs(name))
    finally:
        methods.mae.random_masking = original  # type: ignore[assignment]
    out["loss"].backward()
    reference = _flat({k: p.grad for k, p in model.named_parameters() if p.grad is not None})

    assert sum(r[name]["loss"] for r in ranks) / WORLD == pytest.approx(out["loss"].item(), rel=1e-10)
    for r in ranks:
        torch.testing.assert_close(_flat(r[name]["grads"]), reference, rtol=1e-8, atol=1e-10)
    if name == "dino":  # the center's EMA takes the all-reduced teacher mean: the same as one process
        for r in ranks:
            torch.testing.assert_close(r[name]["center"], model.center)
    # Without the gather each rank normalises (SwAV: balances its codes over) its own half: a different
    # loss. MAE has nothing to gather: its loss is per sample.
    if name in UNGATHERED:
        ungathered = _flat(ranks[0][f"{name}_ungathered"]["grads"])
        assert (ungathered - reference).norm() / reference.norm() > 1e-2


@pytest.mark.timeout(180)
def test_global_batchnorm_statistics_are_float32_under_autocast(ranks: list[dict[str, Any]]) -> None:
    """As `BatchNorm` and `SyncBatchNorm` do: bfloat16 in and out, float32 statistics in between."""
    x = _bn_data()
    reference = torch.nn.BatchNorm2d(3)
    y = reference(x.float())  # one process, the whole batch, float32 throughout
    for rank, r in enumerate(ranks):
        assert r["bn_dtype"] == "torch.bfloat16"
        torch.testing.assert_close(r["bn_running_mean"], reference.running_mean, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(r["bn_running_var"], reference.running_var, rtol=1e-5, atol=1e-5)
        mine = slice(rank * N // WORLD, (rank + 1) * N // WORLD)
        torch.testing.assert_close(r["bn_out"], y[mine].to(torch.bfloat16).float(), rtol=0, atol=1e-2)
