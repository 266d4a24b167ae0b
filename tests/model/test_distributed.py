"""CLIA (stage 2) and the weak MIL contrast across 2 gloo workers equal the single-process
loss and gradient on the union batch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from reir.model import ReirCriterion, create_model
from reir.model.processing import TrainBatch

from .synthetic import make_dataset

SPLIT = (3, 2)  # uneven per-worker batches exercise the padding path
PARAM = "vision.heads.embed.0.weight"


def _setup(n_images: int) -> tuple[torch.nn.Module, object, list]:
    torch.manual_seed(0)
    model, proc = create_model("tiny")
    return model, proc, make_dataset(5, n_images)


def _batch(proc: object, data: list) -> TrainBatch:
    return proc.collate([s for _, s in data], [im for im, _ in data])  # type: ignore[attr-defined]


def _worker(rank: int, world: int, init_file: str, out_dir: str, stage: str, key: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, proc, data = _setup(sum(SPLIT))
        lo = sum(SPLIT[:rank])
        batch = _batch(proc, data[lo : lo + SPLIT[rank]])
        parts = ReirCriterion(model.config, stage=stage, rank=rank, world_size=world)(model, batch)
        n_texts = batch.input_ids.shape[0]
        # Weight by local text count so the sum over ranks is the global sum over texts.
        (parts[key] * n_texts).backward()
        grad = dict(model.named_parameters())[PARAM].grad
        dist.all_reduce(grad)
        torch.save({"clia_sum": parts[key].detach() * n_texts, "grad": grad}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("stage,key", [("2", "loss_clia"), ("2", "loss_rec"), ("weak", "loss_weak")])
def test_contrast_all_gather_matches_single_process(tmp_path: Path, stage: str, key: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), stage, key), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    model, proc, data = _setup(sum(SPLIT))
    batch = _batch(proc, data)
    texts_0 = {t for _, s in data[: SPLIT[0]] for t, _ in s.refs}
    assert texts_0 & {t for _, s in data[SPLIT[0] :] for t, _ in s.refs}, "want a cross-worker duplicate"
    parts = ReirCriterion(model.config, stage=stage)(model, batch)
    n_texts = batch.input_ids.shape[0]
    (parts[key] * n_texts).backward()
    total = sum(r["clia_sum"] for r in results)
    torch.testing.assert_close(total, parts[key].detach() * n_texts, rtol=1e-4, atol=1e-4)
    grad = dict(model.named_parameters())[PARAM].grad
    torch.testing.assert_close(results[0]["grad"], grad, rtol=1e-3, atol=1e-5)
