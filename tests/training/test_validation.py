"""Held-out evaluation during training: the ranking and the metrics on a gallery whose
answers are known (a stand-in model and processor, injected), and the curves PNG."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from reir.data.formats import Query
from reir.model.processing import Instance
from reir.training.validation import HeldOutSet, evaluate_held_out, plot_curves

LEFT, RIGHT = [0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 10.0, 10.0]


class _Processor:
    """Image k (its red level) holds two instances, LEFT and RIGHT, with one-hot embeddings
    2k and 2k+1; a query's text is looked up in a table of embeddings."""

    def __init__(self, text_table: dict[str, int]) -> None:
        self.text_table = text_table

    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.tensor([[float(im.getpixel((0, 0))[0])] for im in images])  # type: ignore[index]

    def postprocess(self, out: torch.Tensor, sizes: Sequence[tuple[int, int]], top_k: int) -> list[list[Instance]]:
        per_image = []
        for k in out[:, 0].long().tolist():
            per_image.append([Instance(box, 0.9, np.eye(6, dtype=np.float32)[2 * k + j], j)
                              for j, box in enumerate([LEFT, RIGHT])])
        return per_image

    def text(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([[self.text_table[t]] for t in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class _Model:
    def __init__(self, text_embeddings: torch.Tensor) -> None:
        self.text_embeddings = text_embeddings
        self.training = True
        self.device = torch.device("cpu")

    def parameters(self) -> Iterator[torch.Tensor]:
        yield torch.zeros(1)

    def eval(self) -> None:
        self.training = False

    def train(self, mode: bool = True) -> None:
        self.training = mode

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pixel_values

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        return SimpleNamespace(embeddings=self.text_embeddings[input_ids[:, 0]])

    def score(self, text: torch.Tensor, inst: torch.Tensor) -> torch.Tensor:
        return text @ inst.T


def test_held_out_metrics_follow_the_ranking() -> None:
    one_hot = torch.eye(6)
    texts = {
        "a left": one_hot[0],  # image a's LEFT instance first: a hit at rank 1, and in its image
        "b right": one_hot[2] + 0.5 * one_hot[3],  # b's LEFT first (wrong box), RIGHT second
        "c left": one_hot[0] + 0.5 * one_hot[4],  # a's LEFT first (wrong image), c's LEFT second
    }
    queries = [Query("q0", "a left", "a", tuple(LEFT)), Query("q1", "b right", "b", tuple(RIGHT)),  # type: ignore[arg-type]
               Query("q2", "c left", "c", tuple(LEFT))]  # type: ignore[arg-type]
    images = [Image.new("RGB", (40, 40), (k, 0, 0)) for k in range(3)]
    held = HeldOutSet(queries=queries, image_ids=["a", "b", "c"], images=images)
    model = _Model(torch.stack(list(texts.values())))
    metrics = evaluate_held_out(model, _Processor({t: i for i, t in enumerate(texts)}), held)
    assert metrics["BR@1@0.5"] == pytest.approx(1 / 3)
    assert metrics["BR@5@0.5"] == metrics["BR@10@0.5"] == pytest.approx(1.0)
    assert metrics["REC_Acc@0.5"] == pytest.approx(2 / 3)  # b's best in-image box is the wrong one
    assert model.training  # back in training mode


def test_held_out_set_is_capped_and_every_query_image_is_in_the_gallery(tmp_path: Path) -> None:
    from reir.data.formats import test_queries
    from reir.data.synth import generate

    generate(tmp_path, num_images=20, test_fraction=0.4, image_size=64, seed=2, discovery_queries=0)
    held = HeldOutSet.load(tmp_path, max_queries=5, max_images=4)
    assert 1 <= len(held.queries) <= 5 and len(held.images) == len(held.image_ids) == 4
    assert {q.image_id for q in held.queries} <= set(held.image_ids)
    assert [q.query_id for q in held.queries] == [q.query_id for q in test_queries(tmp_path)][: len(held.queries)]
    (tmp_path / "no_test").mkdir()
    (tmp_path / "no_test" / "reircoco.json").write_text("[]")
    with pytest.raises(ValueError, match="no_test/reircoco.json: no test-split queries"):
        HeldOutSet.load(tmp_path / "no_test", max_queries=5, max_images=4)


def test_curves_png_is_written_even_before_the_first_evaluation(tmp_path: Path) -> None:
    history = {"train": [{"step": s, "loss": 3.0 / s, "loss_rec": 1.0 / s} for s in range(1, 6)], "eval": []}
    png = plot_curves(history, tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
