"""Image-level retrieval head: one global vector per image, one per expression.

This is the first stage of the *two-stage* baseline that reir is measured against
(``reir.evaluation.baselines``): retrieve whole images for the expression, then ground it
inside each retrieved image. A retrieval model such as SigLIP pools its image tokens into one
vector with an attention probe (a "MAP" head) and is trained with a sigmoid loss on
(image, caption) pairs; this head does the same on the frozen visual branch's token grid
(after its transformer encoder, so every token has seen the whole image), trained on the
benchmark's expressions, each paired with the image it refers into
(``reir.training.image_retrieval``):

    image:       g = normalize(P_i(z + MLP(LN(z)))),  z = MHA(probe, LN(tokens))
    expression:  u = normalize(t + P_t(LN(mean of the text tower's token states)))
    logit        = exp(s) * <u, g> + b

``t`` is the dual encoder's own expression embedding (frozen); ``P_t`` starts at zero, so
training starts from the dual encoder's text side and adapts it to whole images. The image
side needs no text: ``g`` is computed once per image at ingestion time, like any image index.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .configuration import ImageRetrievalSpec
from .modeling_visual import Mlp

SCALE_INIT = math.log(10.0)  # SigLIP's initial temperature and bias
BIAS_INIT = -10.0
MAX_SCALE = 100.0


class ImageRetrievalHead(nn.Module):
    """``tokens [B, Q, H] -> [B, D]`` image vectors, expressions ``-> [T, D]``, logits ``[T, B]``."""

    def __init__(self, spec: ImageRetrievalSpec, token_dim: int, text_hidden: int, embed_dim: int) -> None:
        super().__init__()
        if spec.hidden_size <= 0:
            raise ValueError("ImageRetrievalSpec.hidden_size must be > 0 to build the head")
        if token_dim % spec.num_heads:
            raise ValueError(f"num_heads {spec.num_heads} does not divide the token width {token_dim}")
        self.spec = spec
        self.probe = nn.Parameter(torch.randn(1, 1, token_dim) / math.sqrt(token_dim))
        self.token_norm = nn.LayerNorm(token_dim)
        self.attention = nn.MultiheadAttention(token_dim, spec.num_heads, batch_first=True)
        self.mlp_norm = nn.LayerNorm(token_dim)
        self.mlp = Mlp(token_dim, spec.hidden_size, token_dim)
        self.image_proj = nn.Linear(token_dim, embed_dim)
        self.text_norm = nn.LayerNorm(text_hidden)
        self.text_proj = nn.Linear(text_hidden, embed_dim)
        nn.init.zeros_(self.text_proj.weight)
        nn.init.zeros_(self.text_proj.bias)
        # Shape [1]: DeepSpeed ZeRO cannot flatten 0-dim parameters.
        self.logit_scale = nn.Parameter(torch.tensor([SCALE_INIT]))
        self.logit_bias = nn.Parameter(torch.tensor([BIAS_INIT]))

    def embed_images(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [B, Q, H]`` (the visual encoder's final grid) -> ``[B, D]`` L2-normalized."""
        x = self.token_norm(tokens)
        pooled, _ = self.attention(self.probe.expand(x.shape[0], -1, -1), x, x, need_weights=False)
        pooled = pooled + self.mlp(self.mlp_norm(pooled))
        return F.normalize(self.image_proj(pooled[:, 0]), dim=-1)

    def embed_texts(self, text_emb: torch.Tensor, pooled_states: torch.Tensor) -> torch.Tensor:
        """``text_emb [T, D]`` (the dual encoder's expression embeddings) and ``pooled_states
        [T, Ht]`` (:func:`pool_token_states`) -> ``[T, D]`` L2-normalized."""
        return F.normalize(text_emb + self.text_proj(self.text_norm(pooled_states)), dim=-1)

    def logits(self, texts: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """``[T, D] x [B, D] -> [T, B]`` SigLIP-style logits ``exp(s) * cos + b``."""
        return self.logit_scale.exp().clamp(max=MAX_SCALE) * texts @ images.T + self.logit_bias

    def forward(self, tokens: torch.Tensor, text_emb: torch.Tensor, pooled_states: torch.Tensor) -> torch.Tensor:
        """Logits ``[T, B]`` of every expression against every image of a batch."""
        return self.logits(self.embed_texts(text_emb, pooled_states), self.embed_images(tokens))


def pool_token_states(token_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[T, L, Ht]``, ``[T, L]`` -> ``[T, Ht]``: the mean over the expression's real tokens."""
    mask = attention_mask.to(token_states.dtype)[..., None]
    return (token_states * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def image_retrieval_loss(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss: ``logits [T, B]``, ``positives [T, B]`` bool (the
    expression refers into that image); summed over images, averaged over expressions."""
    signs = positives.to(logits.dtype) * 2.0 - 1.0
    return -F.logsigmoid(signs * logits).sum() / max(1, logits.shape[0])
