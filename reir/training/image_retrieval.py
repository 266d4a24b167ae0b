"""Stage ``image-retrieval``: train the two-stage baseline's image retriever on a frozen model.

The head (:class:`reir.model.image_retrieval.ImageRetrievalHead`) pools the frozen visual
branch's token grid into one vector per image and is trained, like an image-text retrieval
model, with a pairwise sigmoid loss: every expression of a batch against every image of it,
positive for the image the expression refers into. Batches are drawn from one negative group
(``reir.data.negative_groups``): an expression is known not to hold in the other images of
its group, so no negative pair is a false one (the benchmark repeats expressions across
groups). The frozen features are computed once per image, as for stage ``rerank``, so the
time budget goes to the head.

Pure torch (no Ray): the Ray Train + DeepSpeed loop in ``reir.training.trainer`` calls it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from reir.data.formats import ImageSample
from reir.model.image_retrieval import ImageRetrievalHead, image_retrieval_loss, pool_token_states
from reir.model.modeling import ReirModel
from reir.model.processing import ReirProcessor


@dataclass
class ImageRetrievalSet:
    """Frozen features of a training shard: N images, T expressions."""

    image_ids: list[str]
    tokens: torch.Tensor  # [N, Q, H] the visual encoder's final token grid
    groups: torch.Tensor  # [N] long, negative group of each image
    text_emb: torch.Tensor  # [T, D] the dual encoder's expression embeddings
    pooled_states: torch.Tensor  # [T, Ht] mean of the text tower's token states
    text_image: torch.Tensor  # [T] long, image row of each expression

    @property
    def num_texts(self) -> int:
        return int(self.text_image.numel())


@torch.no_grad()
def build_image_retrieval_set(
    model: ReirModel,
    processor: ReirProcessor,
    samples: Sequence[ImageSample],
    groups: Sequence[int],
    load_image: Callable[[str], Image.Image],
    *,
    batch_size: int = 32,
) -> ImageRetrievalSet:
    """Every image's token grid and every expression's text features, by the frozen model.
    Expressions need no referent box: only the image they refer into."""
    device = model.device
    tokens = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        pixels = processor.images([load_image(s.path) for s in chunk]).to(device)
        tokens.append(model.vision.encode_tokens(pixels).float().cpu())
    texts = [(row, text) for row, s in enumerate(samples) for text, _ in s.refs]
    emb, pooled = [], []
    for start in range(0, len(texts), 256):
        enc = processor.text([t for _, t in texts[start : start + 256]])
        enc = {k: v.to(device) for k, v in enc.items()}
        out = model.encode_text(enc["input_ids"], enc["attention_mask"])
        assert out.token_states is not None
        emb.append(out.embeddings.float().cpu())
        pooled.append(pool_token_states(out.token_states, enc["attention_mask"]).float().cpu())
    hidden = model.text_hidden_size
    return ImageRetrievalSet(
        image_ids=[s.image_id for s in samples],
        tokens=torch.cat(tokens) if tokens else torch.zeros(0, model.num_queries, model.config.vision_spec.hidden_size),
        groups=torch.as_tensor(list(groups), dtype=torch.long),
        text_emb=torch.cat(emb) if emb else torch.zeros(0, model.config.embed_dim),
        pooled_states=torch.cat(pooled) if pooled else torch.zeros(0, hidden),
        text_image=torch.tensor([row for row, _ in texts], dtype=torch.long),
    )  # fmt: skip


def sample_image_batch(
    rs: ImageRetrievalSet, images: int, texts_per_image: int, generator: torch.Generator,
    allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image rows [B], expression indices [T])``: up to ``images`` images of one negative
    group (drawn in proportion to its share of the expressions) and up to ``texts_per_image``
    of each one's expressions. ``allowed [T_all]`` bool: the expressions that may be drawn."""
    pool = torch.nonzero(allowed).squeeze(1) if allowed is not None else torch.arange(rs.num_texts)
    if pool.numel() == 0:
        raise ValueError("no expression to train the image retriever on")
    pick = int(pool[torch.randint(pool.numel(), (1,), generator=generator)])
    group = rs.groups[rs.text_image[pick]]
    candidates = torch.nonzero(rs.groups == group).squeeze(1)
    rows = candidates[torch.randperm(candidates.numel(), generator=generator)[:images]]
    texts = []
    for row in rows.tolist():
        own = pool[rs.text_image[pool] == row]
        texts.append(own[torch.randperm(own.numel(), generator=generator)[:texts_per_image]])
    return rows, torch.cat(texts)


def image_retrieval_step(
    head: ImageRetrievalHead | torch.nn.Module, rs: ImageRetrievalSet, rows: torch.Tensor, texts: torch.Tensor,
    *, device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """The loss of one batch and its in-batch text -> image top-1 accuracy."""
    logits = head(rs.tokens[rows].to(device), rs.text_emb[texts].to(device), rs.pooled_states[texts].to(device))
    positives = rs.text_image[texts][:, None].to(device) == rows[None, :].to(device)
    acc = positives.gather(1, logits.argmax(dim=1, keepdim=True)).float().mean()
    return {"loss": image_retrieval_loss(logits, positives), "image_retrieval_acc": acc}


@torch.no_grad()
def group_recall(head: ImageRetrievalHead, rs: ImageRetrievalSet, texts: torch.Tensor, ks: Sequence[int] = (1, 10),
                 *, device: torch.device | str = "cpu") -> dict[str, float]:  # fmt: skip
    """Recall@k of ``texts`` retrieving their own image among all images of their group."""
    if texts.numel() == 0:
        return {f"image_R@{k}": 0.0 for k in ks}
    images = torch.cat([head.embed_images(rs.tokens[lo : lo + 64].to(device)) for lo in range(0, len(rs.tokens), 64)])
    queries = head.embed_texts(rs.text_emb[texts].to(device), rs.pooled_states[texts].to(device))
    sims = queries @ images.T
    own = rs.text_image[texts].to(device)
    same = rs.groups.to(device)[None, :] == rs.groups.to(device)[own][:, None]
    sims = sims.masked_fill(~same, float("-inf"))
    rank = (sims > sims.gather(1, own[:, None])).sum(dim=1)
    return {f"image_R@{k}": float((rank < k).float().mean()) for k in ks}
