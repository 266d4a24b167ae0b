"""Stage ``image-retrieval`` (the two-stage baseline's image retriever): the frozen feature
set, one-group batches, and the stage through Ray Train + DeepSpeed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from reir.data.formats import load_samples, negative_groups
from reir.model import create_model
from reir.training.config import TrainConfig
from reir.training.image_retrieval import (
    ImageRetrievalSet,
    build_image_retrieval_set,
    group_recall,
    image_retrieval_step,
    sample_image_batch,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from reir.data.synth import generate

    root = tmp_path_factory.mktemp("image-retrieval") / "data"
    generate(root, num_images=12, test_fraction=0.25, image_size=64, seed=5, discovery_queries=0)
    return root


def _open(path: str) -> Image.Image:
    with Image.open(path) as f:
        return f.convert("RGB")


def test_feature_set_holds_every_image_and_expression(data: Path) -> None:
    torch.manual_seed(0)
    model, processor = create_model("tiny")
    model.eval()
    samples = load_samples(data, "train")
    groups = [0, 1] * (len(samples) // 2) + [0] * (len(samples) % 2)
    rs = build_image_retrieval_set(model, processor, samples, groups, _open, batch_size=4)
    assert rs.tokens.shape == (len(samples), model.num_queries, 32)
    assert rs.num_texts == sum(len(s.refs) for s in samples) > 0
    assert rs.text_image.tolist() == [row for row, s in enumerate(samples) for _ in s.refs]
    assert rs.text_emb.shape == (rs.num_texts, 32) and rs.pooled_states.shape == (rs.num_texts, 32)
    # the tokens are the visual encoder's final grid, the one its instance heads read
    with torch.no_grad():
        first = model.vision.encode_tokens(processor.images([_open(samples[0].path)]))
    assert torch.allclose(rs.tokens[0], first[0], atol=1e-5)
    head = model.add_image_retrieval(hidden_size=16)
    out = image_retrieval_step(head, rs, torch.tensor([0, 1, 2]), torch.tensor([0, 1]))
    assert float(out["loss"].detach()) > 0 and 0.0 <= float(out["image_retrieval_acc"]) <= 1.0
    recall = group_recall(head.eval(), rs, torch.arange(rs.num_texts))
    assert 0.0 <= recall["image_R@1"] <= recall["image_R@10"] == 1.0  # fewer than 10 images per group


def _set(groups: list[int], texts_per_image: int) -> ImageRetrievalSet:
    n = len(groups)
    text_image = torch.arange(n).repeat_interleave(texts_per_image)
    return ImageRetrievalSet(image_ids=[f"i{k}" for k in range(n)], tokens=torch.zeros(n, 4, 8),
                             groups=torch.tensor(groups), text_emb=torch.zeros(len(text_image), 8),
                             pooled_states=torch.zeros(len(text_image), 8), text_image=text_image)  # fmt: skip


def test_batches_come_from_one_negative_group() -> None:
    rs = _set([0, 0, 0, 1, 1, 1, 1, 2], texts_per_image=5)
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(40):
        rows, texts = sample_image_batch(rs, 3, 2, gen)
        groups = set(rs.groups[rows].tolist())
        assert len(groups) == 1 and len(rows) == len(set(rows.tolist())) <= 3
        assert set(rs.text_image[texts].tolist()) <= set(rows.tolist())  # expressions of batch images only
        assert len(texts) == 2 * len(rows)
        seen |= groups
    assert seen == {0, 1, 2}
    allowed = rs.text_image != 3  # image 3's expressions held out: it still serves as a negative
    for _ in range(20):
        rows, texts = sample_image_batch(rs, 4, 5, gen, allowed)
        assert 3 not in rs.text_image[texts].tolist()
    with pytest.raises(ValueError, match="no expression"):
        sample_image_batch(rs, 4, 5, gen, torch.zeros(rs.num_texts, dtype=torch.bool))


def test_stage_is_a_one_pass_head_stage() -> None:
    cfg = TrainConfig(data_root="d", stage="image-retrieval")
    assert cfg.trains_head and not cfg.trains_reranker
    with pytest.raises(ValueError, match="resume"):
        TrainConfig(data_root="d", stage="image-retrieval", resume=True)


def test_image_retrieval_stage_trains_on_ray_and_deepspeed(ray_session: None, data: Path, tmp_path: Path) -> None:
    from reir.evaluation.comparison import shares_weights
    from reir.training.trainer import run_training

    torch.manual_seed(0)
    model, processor = create_model("tiny")
    model.add_reranker(hidden_size=16)
    start = tmp_path / "rerank"
    model.save_pretrained(start)
    processor.save_pretrained(start)
    cfg = TrainConfig(data_root=str(data), output_dir=str(tmp_path / "runs"), model=str(start),
                      stage="image-retrieval", run_name="image-retrieval", max_steps=3, batch_size=4, lr=1e-3,
                      warmup_steps=1, log_every=1)  # fmt: skip
    model_dir = run_training(cfg)
    args = json.loads((model_dir / "training_args.json").read_text())
    stats = args["stats"]
    samples = load_samples(data, "train")
    assert args["config"]["stage"] == "image-retrieval" and stats["steps"] == 3
    assert stats["image_retrieval_texts"] == sum(len(s.refs) for s in samples) and stats["loss"] > 0
    assert 0.0 <= stats["held_out_image_R@1"] <= stats["held_out_image_R@10"] <= 1.0
    trained, _ = create_model(str(model_dir))
    assert trained.image_retrieval is not None and trained.config.image_retrieval["hidden_size"] == 256
    # everything but the new head stayed frozen: the two-stage system grounds with reir's re-ranker
    assert shares_weights(start, model_dir)
    assert len(set(negative_groups(data, "train", [s.image_id for s in samples]))) >= 1
