"""The image-level retrieval head (the two-stage baseline's retriever): it learns to find the
image an expression refers into, starts from the dual encoder's text side, and travels with
the checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from reir.model import create_model
from reir.model.configuration import ImageRetrievalSpec
from reir.model.image_retrieval import ImageRetrievalHead, image_retrieval_loss, pool_token_states


def _world(n: int, seed: int, *, unique: bool = False, tokens: int = 12, dim: int = 32, objects: int = 3):
    """Images are token grids: ``objects`` tokens carry an object code (one of 256 random
    directions), the rest are background (one direction, plus noise). An expression names one object of its image: its
    embedding is that code seen through a fixed random map, so a head must learn which tokens
    matter and how the two sides relate. ``unique``: no code appears in two images (every
    expression then has exactly one right image)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randn(256, dim, generator=torch.Generator().manual_seed(0))
    text_map = torch.randn(dim, dim, generator=torch.Generator().manual_seed(1)) / dim**0.5
    background = torch.randn(dim, generator=torch.Generator().manual_seed(2))
    grid = background + 0.3 * torch.randn(n, tokens, dim, generator=g)
    order = torch.randperm(256, generator=g)
    named = []
    for i in range(n):
        picks = order[i * objects : (i + 1) * objects] if unique else torch.randperm(256, generator=g)[:objects]
        grid[i, torch.randperm(tokens, generator=g)[:objects]] = codes[picks]
        named.append(int(picks[0]))
    text = codes[named] @ text_map
    return grid, torch.nn.functional.normalize(text, dim=-1), text  # tokens, text_emb, pooled states


def _recall_at_1(head: ImageRetrievalHead, grid: torch.Tensor, text_emb: torch.Tensor, states: torch.Tensor) -> float:
    with torch.no_grad():
        logits = head(grid, text_emb, states)
    return float((logits.argmax(dim=1) == torch.arange(len(grid))).float().mean())


def test_head_learns_to_retrieve_the_image_an_expression_refers_into() -> None:
    torch.manual_seed(0)
    head = ImageRetrievalHead(ImageRetrievalSpec(hidden_size=32, num_heads=2), token_dim=32, text_hidden=32,
                              embed_dim=32)  # fmt: skip
    train, held = _world(1024, seed=1), _world(64, seed=2, unique=True)
    before = _recall_at_1(head, *held)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randperm(1024, generator=gen)[:32]
        logits = head(train[0][idx], train[1][idx], train[2][idx])
        loss = image_retrieval_loss(logits, torch.eye(32, dtype=torch.bool))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _recall_at_1(head, *held)
    assert before < 0.1 and after > 0.3, (before, after)  # chance: 1/64


def test_text_side_starts_as_the_dual_encoders_embedding() -> None:
    head = ImageRetrievalHead(ImageRetrievalSpec(hidden_size=8, num_heads=2), token_dim=8, text_hidden=6, embed_dim=4)
    emb = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    assert torch.allclose(head.embed_texts(emb, torch.randn(3, 6)), emb, atol=1e-6)
    assert torch.allclose(head.embed_images(torch.randn(5, 7, 8)).norm(dim=-1), torch.ones(5), atol=1e-5)


def test_loss_and_pooling() -> None:
    logits = torch.tensor([[5.0, -5.0], [-5.0, 5.0]])
    good = image_retrieval_loss(logits, torch.eye(2, dtype=torch.bool))
    bad = image_retrieval_loss(logits, ~torch.eye(2, dtype=torch.bool))
    assert float(good) < 0.02 and float(bad) > 9.0
    states = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [100.0, 100.0]]])
    assert pool_token_states(states, torch.tensor([[1, 1, 0]])).tolist() == [[2.0, 1.0]]  # padding ignored


def test_bad_specs_are_refused() -> None:
    with pytest.raises(ValueError, match="hidden_size"):
        ImageRetrievalHead(ImageRetrievalSpec(hidden_size=0), token_dim=8, text_hidden=8, embed_dim=4)
    with pytest.raises(ValueError, match="does not divide"):
        ImageRetrievalHead(ImageRetrievalSpec(hidden_size=8, num_heads=3), token_dim=8, text_hidden=8, embed_dim=4)


def test_the_head_travels_with_the_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, processor = create_model("tiny")
    assert model.image_retrieval is None
    with pytest.raises(ValueError, match="image-retrieval"):
        model.encode_image_vectors(torch.rand(1, 3, 64, 64))
    model.add_image_retrieval(hidden_size=16)
    assert model.config.image_retrieval == {"hidden_size": 16, "num_heads": 4}
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = create_model(tmp_path)
    pixels = torch.rand(2, 3, 64, 64)
    text = loaded_processor.text(["the red circle", "the blue square left of the green triangle"])
    with torch.no_grad():
        model.eval()
        want = model.encode_image_vectors(pixels)
        got = loaded.encode_image_vectors(pixels)
        encoded = loaded.encode_text(text["input_ids"], text["attention_mask"])
        queries = loaded.encode_retrieval_text(encoded, text["attention_mask"])
        # the instance branch is untouched by the head: forward still reads the same token grid
        assert torch.equal(loaded.encode_images(pixels).embeddings,
                           loaded.vision.heads(loaded.vision.encode_tokens(pixels))[2])  # fmt: skip
    assert torch.allclose(want, got, atol=1e-6) and got.shape == (2, 32)
    assert queries.shape == (2, 32) and torch.allclose(queries.norm(dim=-1), torch.ones(2), atol=1e-5)
    # a checkpoint saved before the head existed (no "image_retrieval" in its config) still loads
    plain, _ = create_model("tiny")
    plain.config.__dict__.pop("image_retrieval")
    plain.save_pretrained(tmp_path / "old")
    processor.save_pretrained(tmp_path / "old")
    assert "image_retrieval" not in (tmp_path / "old" / "config.json").read_text()
    assert create_model(tmp_path / "old")[0].image_retrieval is None
