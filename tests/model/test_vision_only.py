"""A checkpoint loaded for images only (the ingestion encoders' loader): the same instance
rows as the whole model, none of the text side, and clear errors where text is asked of it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reir.model import create_model
from reir.platform.modeling import load_reir_image_model, load_reir_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(3)
    model, processor = create_model("tiny")
    model.add_reranker()  # a text-side module whose weights the image side must skip
    path = tmp_path_factory.mktemp("vision-only") / "ckpt"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _images() -> list[Image.Image]:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return [Image.new("RGB", (90, 60), "red"), Image.fromarray(noise)]


def test_image_side_gives_the_same_instances_as_the_whole_model(checkpoint: Path) -> None:
    full, full_proc = load_reir_model(str(checkpoint))
    vision, proc = load_reir_image_model(str(checkpoint))
    assert vision.text is None and vision.reranker is None and full.reranker is not None
    assert not vision.training
    # What it holds is the whole model's visual branch and score scale, nothing else.
    full_keys = set(full.state_dict())
    assert set(vision.state_dict()) == {k for k in full_keys if not k.startswith(("text.", "reranker."))}
    assert sum(p.numel() for p in vision.parameters()) < sum(p.numel() for p in full.parameters())
    with torch.no_grad():
        a = full.encode_images(full_proc.images(_images()))
        b = vision.encode_images(proc.images(_images()))
    for name in ("embeddings", "boxes", "objectness_logits"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=0, atol=0)
    sizes = [(90, 60), (64, 64)]
    rows_a = full_proc.postprocess(a, sizes=sizes, top_k=5)
    rows_b = proc.postprocess(b, sizes=sizes, top_k=5)
    assert [[i.box_xywh for i in r] for r in rows_b] == [[i.box_xywh for i in r] for r in rows_a]


def test_image_side_refuses_text_and_saving(checkpoint: Path, tmp_path: Path) -> None:
    vision, proc = load_reir_image_model(str(checkpoint))
    with pytest.raises(ValueError, match="vision_only"):
        vision.encode_text(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="tokenizer=False"):
        proc.text(["the red square"])
    with pytest.raises(ValueError, match="cannot be saved"):
        vision.save_pretrained(tmp_path / "partial")
    with pytest.raises(ValueError, match="tokenizer=False"):
        proc.save_pretrained(tmp_path / "partial")
    assert not (tmp_path / "partial").exists()  # nothing half-written
    with pytest.raises(ValueError, match="not one"):
        create_model("tiny", vision_only=True)


def test_image_side_of_a_conv_model_loads_without_transformers_modeling(checkpoint: Path) -> None:
    """The point of the image-side load: an encoder process skips transformers' modeling code."""
    code = (
        "import sys; from reir.platform.modeling import load_reir_image_model; "
        f"load_reir_image_model({str(checkpoint)!r}); "
        "print('transformers.modeling_utils' in sys.modules, 'tokenizers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
