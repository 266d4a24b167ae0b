"""REIR dual-stream model (CLARE-style): a text-free visual branch that turns an image
into dense instance queries, and a text branch with a Mixture of Relation Experts.

Box format everywhere in this module: normalized ``[cx, cy, w, h]`` relative to the
image (``BoxMode.CXCYWH_NORM``); since images are resized to ``S x S`` without keeping
aspect ratio, these map back exactly to the original image's pixels.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from .configuration import ImageRetrievalSpec, MoreSpec, ReirConfig, RerankSpec, TextSpec, VisionSpec
from .image_retrieval import ImageRetrievalHead, pool_token_states
from .modeling_visual import (
    ConvBackbone,
    EmbeddingProbes,
    InstanceHeads,
    SiglipBackbone,
    build_siglip_vision_tower,
    sine_position_2d,
    vision_grid_size,
)
from .rerank import RelationReranker

if TYPE_CHECKING:
    from transformers import PreTrainedModel

WEIGHTS_NAME = "model.safetensors"
# The modules a vision-only model leaves out (their weights are skipped when it loads).
_TEXT_SIDE = ("text.", "reranker.", "presence.", "image_retrieval.")


@dataclass
class InstanceOutput:
    """Dense instance predictions of the visual branch (Q = number of grid tokens).

    Attributes:
        boxes: ``[B, Q, 4]`` float, normalized ``cxcywh`` in [0, 1].
        objectness_logits: ``[B, Q]`` float, sigmoid gives P(query is an object).
        embeddings: ``[B, Q, D]`` float, L2-normalized instance embeddings.
        class_logits: ``[B, Q, C]`` float category logits, or None when the model has no
            class head (``vision.num_classes == 0``).
        appearance: ``[B, Q, 3]`` float, the predicted mean colour (normalized pixel
            values) of the centre of each query's box, or None without
            ``vision.appearance_head``.
        probes: ``EmbeddingProbes(class_logits [B, Q, C] | None, appearance [B, Q, 3],
            scene_logits [B, Q, K] | None)`` read from the embeddings, or None without
            ``vision.embedding_probes``.
    """

    boxes: torch.Tensor
    objectness_logits: torch.Tensor
    embeddings: torch.Tensor
    class_logits: torch.Tensor | None = None
    appearance: torch.Tensor | None = None
    probes: EmbeddingProbes | None = None


@dataclass
class TextOutput:
    """Text-branch output for T expressions.

    Attributes:
        embeddings: ``[T, D]`` float, L2-normalized.
        aux_loss: ``[]`` scalar, Switch-style expert load-balancing loss.
        gate_probs: ``[T, E]`` float, softmax over all E experts' gate logits.
        token_states: ``[T, L, H]`` the text tower's last hidden states (the re-ranker reads them).
    """

    embeddings: torch.Tensor
    aux_loss: torch.Tensor
    gate_probs: torch.Tensor
    token_states: torch.Tensor | None = None


@dataclass
class ReirOutput:
    """``ReirModel.forward`` output; scale/bias travel along so losses work on wrapped models.

    Attributes:
        instances: :class:`InstanceOutput` or None when no images were given.
        text: :class:`TextOutput` or None when no text was given.
        logit_scale: ``[1]`` log of the score temperature (score = exp(scale) * cos + bias).
        logit_bias: ``[1]`` score bias.
    """

    instances: InstanceOutput | None
    text: TextOutput | None
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor


class EncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` (same parameters, same outputs) whose self-attention is
    written out under CPU bf16 autocast (reir.training.precision): there the fused
    flash-attention kernel's backward was 2x the written-out one over the `small` preset's
    16 x 16 token grid (batch 16, 4 heads of 32: 18.3 against 9.2 ms forward + backward on 2
    cores; in fp32 the fused kernel is faster, 12.2 against 18.9 ms, and stays)."""

    def _sa_block(self, x: torch.Tensor, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
                  is_causal: bool = False) -> torch.Tensor:  # fmt: skip
        if (attn_mask is not None or key_padding_mask is not None or is_causal or x.device.type != "cpu"
                or not torch.is_autocast_enabled("cpu")):  # fmt: skip
            return super()._sa_block(x, attn_mask, key_padding_mask, is_causal)
        attn = self.self_attn
        b, n, d = x.shape
        heads = attn.num_heads
        q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(b, n, 3, heads, d // heads).permute(
            2, 0, 3, 1, 4)  # fmt: skip
        weights = (q @ k.transpose(-1, -2) * (d // heads) ** -0.5).softmax(dim=-1)
        if self.training and attn.dropout > 0:
            weights = F.dropout(weights, attn.dropout)
        out = (weights @ v).transpose(1, 2).reshape(b, n, d)
        return self.dropout1(attn.out_proj(out))


class VisualEncoder(nn.Module):
    """Image -> token grid (+2D sine position) -> transformer encoder -> instance heads."""

    def __init__(self, spec: VisionSpec, embed_dim: int, load_weights: bool) -> None:
        super().__init__()
        if spec.backbone == "cnn":
            self.backbone: nn.Module = ConvBackbone(spec.hidden_size)
        elif spec.backbone == "siglip":
            self.backbone = SiglipBackbone(build_siglip_vision_tower(spec, load_weights))
        else:
            raise ValueError(f"unknown vision backbone {spec.backbone!r}")
        self.grid = vision_grid_size(spec, self.backbone)
        hidden = spec.hidden_size
        self.input_proj = nn.Sequential(nn.Linear(self.backbone.out_channels, hidden), nn.LayerNorm(hidden))
        self.register_buffer("pos", sine_position_2d(self.grid, hidden), persistent=False)
        layer = EncoderLayer(
            hidden,
            spec.num_heads,
            int(hidden * spec.mlp_ratio),
            dropout=spec.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        # Self-attention among all tokens is what lets an instance encode its relations
        # ("left of the red square", "the largest green one").
        self.encoder = nn.TransformerEncoder(layer, spec.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden)
        self.heads = InstanceHeads(spec, self.grid, embed_dim)

    @property
    def num_queries(self) -> int:
        return self.grid * self.grid

    def encode_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` -> the final token grid ``[B, Q, hidden]`` that the heads read."""
        tokens = self.input_proj(self.backbone(pixel_values)) + self.pos
        return self.norm(self.encoder(tokens))

    def forward(self, pixel_values: torch.Tensor) -> InstanceOutput:
        tokens = self.encode_tokens(pixel_values)
        boxes, obj, emb = self.heads(tokens)
        cls = self.heads.classifier(tokens) if self.heads.classifier is not None else None
        app = self.heads.appearance(tokens) if self.heads.appearance is not None else None
        return InstanceOutput(boxes=boxes, objectness_logits=obj, embeddings=emb, class_logits=cls, appearance=app,
                              probes=self.heads.probe(emb))


class MixtureOfRelationExperts(nn.Module):
    """Top-k gated experts mapping the pooled text vector to the embedding space."""

    def __init__(self, in_dim: int, out_dim: int, spec: MoreSpec) -> None:
        super().__init__()
        if not 1 <= spec.top_k <= spec.num_experts:
            raise ValueError(f"need 1 <= top_k <= num_experts, got {spec.top_k}/{spec.num_experts}")
        self.num_experts, self.top_k = spec.num_experts, spec.top_k
        self.gate = nn.Linear(in_dim, spec.num_experts)
        nn.init.normal_(self.gate.weight, std=0.02)  # near-uniform routing at init
        nn.init.zeros_(self.gate.bias)
        self.experts = nn.ModuleList([self._expert(in_dim, out_dim, spec.expert_hidden) for _ in range(spec.num_experts)])

    @staticmethod
    def _expert(in_dim: int, out_dim: int, hidden: int) -> nn.Module:
        if hidden <= 0:
            return nn.Linear(in_dim, out_dim)
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [T, in] -> (out [T, out], aux_loss [], gate_probs [T, E])``."""
        logits = self.gate(x)
        probs = logits.softmax(dim=-1)
        top_logits, top_idx = logits.topk(self.top_k, dim=-1)
        weights = top_logits.softmax(dim=-1)  # renormalized over the chosen experts only
        # Few experts and short batches: running all experts densely is cheaper than gathering.
        expert_out = torch.stack([expert(x) for expert in self.experts], dim=1)  # [T, E, out]
        chosen = expert_out.gather(1, top_idx[..., None].expand(-1, -1, expert_out.shape[-1]))
        out = (weights[..., None] * chosen).sum(dim=1)
        if x.shape[0] == 0:
            return out, logits.sum() * 0.0, probs
        routed = torch.zeros_like(probs).scatter(1, top_idx, 1.0).mean(dim=0) / self.top_k
        aux = self.num_experts * (routed * probs.mean(dim=0)).sum()
        return out, aux, probs


def _build_text_tower(spec: TextSpec, load_weights: bool) -> PreTrainedModel:
    """Built-in random BERT, a local HF dir (creation) or a stored HF config (reload)."""
    # Imported on use: a model loaded for images only builds no text tower and so never pays
    # for transformers' modeling modules (see ReirModel's ``vision_only``).
    from transformers import AutoConfig, AutoModel, BertConfig, BertModel, SiglipTextConfig, SiglipTextModel

    if spec.encoder == "bert":
        if spec.vocab_size is None:
            raise ValueError("text.vocab_size must be set for the built-in BERT encoder")
        cfg = BertConfig(
            vocab_size=spec.vocab_size,
            hidden_size=spec.hidden_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            intermediate_size=spec.intermediate_size,
            max_position_embeddings=max(64, spec.max_length),
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pad_token_id=0,
        )
        return BertModel(cfg, add_pooling_layer=spec.pooling == "pooler")
    if spec.encoder != "hf":
        raise ValueError(f"unknown text encoder {spec.encoder!r}")
    if load_weights and spec.model_path:
        model_type = AutoConfig.from_pretrained(spec.model_path).model_type
        if model_type in ("siglip", "siglip_text_model"):
            return SiglipTextModel.from_pretrained(spec.model_path)
        return AutoModel.from_pretrained(spec.model_path)
    if spec.hf_config is None:
        raise ValueError("text encoder 'hf' needs text.model_path (a local HF dir) or text.hf_config")
    cfg_dict: dict[str, Any] = dict(spec.hf_config)
    model_type = cfg_dict.pop("model_type")
    if model_type == "siglip_text_model":
        return SiglipTextModel(SiglipTextConfig(**cfg_dict))
    return AutoModel.from_config(AutoConfig.for_model(model_type, **cfg_dict))


class TextEncoder(nn.Module):
    """Tokens -> HF encoder -> pooled vector -> MoRE -> L2-normalized ``[T, D]``."""

    def __init__(self, spec: TextSpec, more: MoreSpec, embed_dim: int, load_weights: bool) -> None:
        super().__init__()
        self.pooling = spec.pooling
        self.model: PreTrainedModel = _build_text_tower(spec, load_weights)
        # Plain (eager) attention: expressions are short, and under CPU bf16 autocast
        # (reir.training.precision) the fused flash-attention kernel's backward over padded
        # expressions was 3x slower than fp32, while eager attention's bf16 matrix products are
        # not. Forward and backward of the `small` tower over a stage-2 batch (192 expressions,
        # 2 cores): 70 ms in bf16 against 115-125 ms in fp32; fp32 outputs equal sdpa's to 1e-7.
        self.model.set_attn_implementation("eager")
        self.more = MixtureOfRelationExperts(int(self.model.config.hidden_size), embed_dim, more)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextOutput:
        if input_ids.shape[0] == 0:
            return self._empty(input_ids)
        states = self._fused_bert(input_ids, attention_mask) if self.pooling != "pooler" else None
        if states is None:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
            states = out.last_hidden_state
        if self.pooling == "pooler":
            pooled = out.pooler_output
        elif self.pooling == "cls":
            pooled = states[:, 0]
        else:
            mask = attention_mask[..., None].to(states.dtype)
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        emb, aux, probs = self.more(pooled)
        return TextOutput(embeddings=F.normalize(emb, dim=-1), aux_loss=aux, gate_probs=probs, token_states=states)

    def _fused_bert(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """A BERT tower's last hidden states through torch's fused encoder-layer kernel (the one
        ``nn.TransformerEncoderLayer`` runs in inference), or None where it does not apply
        (training, gradients on, autocast, another architecture). Same maths as the HF layers
        (post-norm, exact GELU, the padding keys masked; equal to 1e-6 in float32), fewer
        operations: a one-query encode is mostly per-operation overhead on a CPU (the demo's
        2-layer tower: 0.91 against 0.51 ms, docs/query-path.md)."""
        from transformers import BertModel

        tower, config = self.model, self.model.config
        device = input_ids.device.type
        if (self.training or torch.is_grad_enabled() or not isinstance(tower, BertModel)
                or getattr(config, "hidden_act", None) != "gelu" or getattr(config, "is_decoder", False)
                or getattr(config, "position_embedding_type", "absolute") != "absolute"
                or device not in ("cpu", "cuda") or torch.is_autocast_enabled(device)):  # fmt: skip
            return None
        x = tower.embeddings(input_ids=input_ids)
        pad = attention_mask == 0
        mask, mask_type = (pad, 1) if bool(pad.any()) else (None, None)
        for layer in tower.encoder.layer:
            attn, out = layer.attention.self, layer.attention.output
            x = torch._transformer_encoder_layer_fwd(
                x, x.shape[-1], int(config.num_attention_heads),
                torch.cat([attn.query.weight, attn.key.weight, attn.value.weight]),
                torch.cat([attn.query.bias, attn.key.bias, attn.value.bias]),
                out.dense.weight, out.dense.bias, True, False, float(out.LayerNorm.eps),
                out.LayerNorm.weight, out.LayerNorm.bias, layer.output.LayerNorm.weight, layer.output.LayerNorm.bias,
                layer.intermediate.dense.weight, layer.intermediate.dense.bias,
                layer.output.dense.weight, layer.output.dense.bias, mask, mask_type,
            )  # fmt: skip
        return x

    def _empty(self, input_ids: torch.Tensor) -> TextOutput:
        # No expressions in this batch: still run one dummy row so that every parameter
        # takes part in the graph (data-parallel wrappers expect identical graphs on all
        # ranks), then drop it; the zero-weighted outputs contribute no gradient.
        dummy = torch.zeros(1, 1, dtype=torch.long, device=input_ids.device)
        full = self.forward(dummy, torch.ones_like(dummy))
        return TextOutput(full.embeddings[:0], full.aux_loss * 0.0, full.gate_probs[:0])


# A new re-ranker reads the expression through one transformer layer of its own (RerankSpec.
# text_layers; a stored config without the field has none). On the demo's stage-2 model and
# 4,000 steps it took BR@1 from 2.9% (below the ANN order's 4.9%) to 13.1% (docs/model.md).
NEW_RERANKER_TEXT_LAYERS = 1
# A new re-ranker has the image-wide context relation (RerankSpec.context_relation); a stored
# config without the field has none.
NEW_RERANKER_CONTEXT_RELATION = True
# A new re-ranker has one instance-set layer (RerankSpec.set_layers): on the 2026-11-28 demo's
# stage-2 model BR@1 56.2% after 2,000 steps against 49.6% after 3,500 without it (docs/model.md).
# A stored config without the field has none.
NEW_RERANKER_SET_LAYERS = 1
# A new re-ranker's relation-slot queries start 4x the unit-variance scale (RerankSpec.query_init).
# At unit scale each slot's attention over the expression's tokens starts nearly uniform and every
# slot pools about the same vector (mean cosine 0.998); on the 2026-11-30 demo's stage-2 model one
# of four seeds never broke that symmetry in 1,800 steps (BR@1 26.7%, the loss stalled at ~1.7-1.9),
# and at 4x that seed learned (66.6%) and two others gave 68.5 / 70.4% against 68.2 / 64.5%
# (docs/model.md, "The re-ranker"). Not the class default: on a toy world of 8-wide token states
# (tests/training/test_rerank_discovery.py) 4x learned worse (mean F1 0.78 against 0.92, 4 seeds).
NEW_RERANKER_QUERY_INIT = 4.0


class ReirModel(nn.Module):
    """Dual-stream REIR model. Build with :func:`reir.model.create_model`.

    ``load_towers=False`` builds HF towers from the configs stored in ``config`` instead
    of reading ``model_path`` (used when loading a saved checkpoint).

    ``vision_only=True`` builds the visual branch and the score's scale and bias, nothing
    that reads text (no text tower, re-ranker or image retrieval head): what an ingestion
    encoder needs. Such a model encodes images only and cannot be saved.
    """

    config_class = ReirConfig

    def __init__(self, config: ReirConfig, *, load_towers: bool = True, vision_only: bool = False) -> None:
        super().__init__()
        self.config = config
        self.vision_only = vision_only
        self.vision = VisualEncoder(config.vision_spec, config.embed_dim, load_towers)
        self.text: TextEncoder | None = None
        if not vision_only:
            self.text = TextEncoder(config.text_spec, config.more_spec, config.embed_dim, load_towers)
        # Shape [1], not []: DeepSpeed ZeRO cannot flatten 0-dim parameters.
        self.logit_scale = nn.Parameter(torch.tensor([float(config.logit_scale_init)]))
        self.logit_bias = nn.Parameter(torch.tensor([float(config.logit_bias_init)]))
        self.reranker: RelationReranker | None = None
        if config.rerank_spec.hidden_size > 0 and not vision_only:
            self.reranker = self._build_reranker(config.rerank_spec)
        # Discover mode's presence head: the re-ranker's form, trained to say whether an image
        # holds what a generic query describes (reir.training.rerank); rank mode never reads it.
        self.presence: RelationReranker | None = None
        if config.presence_spec.hidden_size > 0 and not vision_only:
            self.presence = self._build_reranker(config.presence_spec)
        # Not part of reir's query path: the two-stage baseline's image retriever (see
        # reir.model.image_retrieval); only checkpoints trained for that baseline have one.
        self.image_retrieval: ImageRetrievalHead | None = None
        if config.image_retrieval_spec.hidden_size > 0 and not vision_only:
            self.image_retrieval = self._build_image_retrieval(config.image_retrieval_spec)
        self._record_tower_configs()

    def _text_encoder(self) -> TextEncoder:
        if self.text is None:
            raise ValueError("this model was loaded with vision_only=True: it encodes images, not text")
        return self.text

    @property
    def text_hidden_size(self) -> int:
        """Width of the text tower's token states (what the re-ranker and retrieval head read)."""
        return int(self._text_encoder().model.config.hidden_size)

    def _build_reranker(self, spec: RerankSpec) -> RelationReranker:
        return RelationReranker(spec, self.text_hidden_size, self.config.embed_dim)

    def add_reranker(self, **spec: Any) -> RelationReranker:
        """Attach a fresh (untrained) re-ranker, in this model's train / eval mode; returns it."""
        stored = dict(self.config.rerank)
        if stored.get("hidden_size", 0) <= 0:  # the config says "none": the new one's defaults
            stored.update(hidden_size=128, text_layers=NEW_RERANKER_TEXT_LAYERS,
                          context_relation=NEW_RERANKER_CONTEXT_RELATION, set_layers=NEW_RERANKER_SET_LAYERS,
                          query_init=NEW_RERANKER_QUERY_INIT)
        rerank_spec = RerankSpec(**{**stored, **spec})
        if rerank_spec.hidden_size <= 0:
            rerank_spec = replace(rerank_spec, hidden_size=128)
        self.config.rerank = asdict(rerank_spec)
        self.reranker = self._build_reranker(rerank_spec).to(self.device).train(self.training)
        return self.reranker

    def add_presence(self, *, image_term: bool = False) -> RelationReranker:
        """Attach discover mode's presence head: the re-ranker's form and, as a start, a copy of
        its weights (it already reads attributes and relations); returns it, trainable.
        ``image_term``: with the image-level term (:class:`RerankSpec`), which starts at zero."""
        if self.reranker is None:
            raise ValueError("the presence head starts from the re-ranker: this model has none")
        spec = replace(self.config.rerank_spec, image_term=image_term)
        self.config.presence = asdict(spec)
        self.presence = self._build_reranker(spec).to(self.device).train(self.training)
        missing, unexpected = self.presence.load_state_dict(self.reranker.state_dict(), strict=False)
        if unexpected or any(not k.startswith("image_") for k in missing):
            raise ValueError(f"the re-ranker's weights do not fit the presence head: {missing + unexpected}")
        return self.presence

    def _build_image_retrieval(self, spec: ImageRetrievalSpec) -> ImageRetrievalHead:
        return ImageRetrievalHead(spec, self.config.vision_spec.hidden_size, self.text_hidden_size,
                                  self.config.embed_dim)  # fmt: skip

    def add_image_retrieval(self, **spec: Any) -> ImageRetrievalHead:
        """Attach a fresh (untrained) image-level retrieval head, in this model's train / eval
        mode; returns it."""
        retrieval_spec = ImageRetrievalSpec(**{**self.config.image_retrieval, **spec})
        if retrieval_spec.hidden_size <= 0:
            retrieval_spec = replace(retrieval_spec, hidden_size=256)
        self.config.image_retrieval = asdict(retrieval_spec)
        head = self._build_image_retrieval(retrieval_spec).to(self.device).train(self.training)
        self.image_retrieval = head
        return head

    def encode_image_vectors(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``pixel_values [B,3,S,S]`` -> ``[B, D]`` global image vectors (needs ``image_retrieval``)."""
        if self.image_retrieval is None:
            raise ValueError("this model has no image-level retrieval head (reir train --stage image-retrieval)")
        return self.image_retrieval.embed_images(self.vision.encode_tokens(pixel_values))

    def encode_retrieval_text(self, text: TextOutput, attention_mask: torch.Tensor) -> torch.Tensor:
        """Expressions as ``encode_text`` left them -> ``[T, D]`` vectors to score against
        :meth:`encode_image_vectors` (needs ``image_retrieval``)."""
        if self.image_retrieval is None:
            raise ValueError("this model has no image-level retrieval head (reir train --stage image-retrieval)")
        assert text.token_states is not None
        pooled = pool_token_states(text.token_states, attention_mask.to(text.token_states.device))
        return self.image_retrieval.embed_texts(text.embeddings, pooled)

    def _record_tower_configs(self) -> None:
        # Keep the HF tower configs in ReirConfig so a saved checkpoint rebuilds offline
        # without the original local directories.
        backbone = self.vision.backbone
        if isinstance(backbone, SiglipBackbone):
            tower_cfg: Any = backbone.tower.config
            self.config.vision["hf_config"] = tower_cfg.to_dict()
            self.config.vision["image_size"] = int(tower_cfg.image_size)
        if self.config.text["encoder"] == "hf" and self.text is not None:
            self.config.text["hf_config"] = self.text.model.config.to_dict()

    @property
    def num_queries(self) -> int:
        """Q: instance queries per image."""
        return self.vision.num_queries

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def encode_images(self, pixel_values: torch.Tensor) -> InstanceOutput:
        """``pixel_values [B,3,S,S]`` (see ``ReirProcessor.images``) -> :class:`InstanceOutput`."""
        return self.vision(pixel_values)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextOutput:
        """``input_ids, attention_mask [T, L]`` -> :class:`TextOutput`."""
        return self._text_encoder()(input_ids, attention_mask)

    def score(self, text_emb: torch.Tensor, inst_emb: torch.Tensor) -> torch.Tensor:
        """All-pairs logits ``[T, ...]`` for ``text_emb [T, D]`` and ``inst_emb [..., D]``."""
        sims = torch.einsum("td,...d->t...", text_emb, inst_emb)
        return score_from_similarity(sims, self.logit_scale, self.logit_bias)

    def rerank_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        inst_emb: torch.Tensor,
        boxes: torch.Tensor,
        objectness: torch.Tensor,
        inst_mask: torch.Tensor,
        text_index: torch.Tensor | None = None,
        text: TextOutput | None = None,
        presence: bool = False,
    ) -> torch.Tensor:
        """Re-ranked logits ``[N, M]`` of every stored instance of N candidate images.

        ``input_ids/attention_mask [T, L]`` the expressions; ``inst_emb [N, M, D]``,
        ``boxes [N, M, 4]`` (cxcywh normalized), ``objectness [N, M]``, ``inst_mask [N, M]``
        describe each candidate image's instances as stored in the index; ``text_index [N]``
        says which expression row n is scored for (default: all rows for expression 0).
        Without a re-ranker the dual encoder's logits come back (same order as the ANN).
        ``text``: the expressions already encoded (``encode_text`` of the same ids), so a
        query path that encoded them for the search does not encode them again.
        ``presence``: discover mode's presence head scores them (the re-ranker where the
        checkpoint has no such head).
        """
        if text is None:
            text = self.encode_text(input_ids, attention_mask)
        if text_index is None:
            text_index = torch.zeros(inst_emb.shape[0], dtype=torch.long, device=inst_emb.device)
        emb = text.embeddings[text_index]
        base = score_from_similarity(torch.einsum("nd,nmd->nm", emb, inst_emb), self.logit_scale, self.logit_bias)
        head = self.presence if presence and self.presence is not None else self.reranker
        if head is None:
            return base.masked_fill(~inst_mask.bool(), float("-inf"))
        assert text.token_states is not None
        return head(
            text.token_states, attention_mask, base, inst_emb, boxes, objectness, inst_mask, text_rows=text_index
        )

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> ReirOutput:
        instances = self.vision(pixel_values) if pixel_values is not None else None
        text = None
        if input_ids is not None:
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            text = self._text_encoder()(input_ids, mask)
        return ReirOutput(instances, text, self.logit_scale, self.logit_bias)

    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> None:
        """Write ``config.json`` + ``model.safetensors`` into ``save_directory``."""
        if self.vision_only:
            raise ValueError("a model loaded with vision_only=True holds part of the weights and cannot be saved")
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(path)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike[str], *, map_location: str | torch.device = "cpu", vision_only: bool = False
    ) -> ReirModel:
        """Load a directory written by :meth:`save_pretrained` (no network access).

        ``vision_only``: the image side only (see the class docstring); every weight it
        builds must be in the file, and the text side's weights are not read into the model."""
        path = Path(directory)
        config = ReirConfig.from_pretrained(path)
        model = cls(config, load_towers=False, vision_only=vision_only)
        state = load_file(str(path / WEIGHTS_NAME), device="cpu")
        if vision_only:
            state = {k: v for k, v in state.items() if not k.startswith(_TEXT_SIDE)}
        model.load_state_dict(state, strict=True)
        return model.to(map_location).eval()


def score_scale(logit_scale: torch.Tensor) -> torch.Tensor:
    """The multiplier of the cosine in the score: ``exp(logit_scale)``, capped for stability."""
    return logit_scale.exp().clamp(max=100.0)


def score_from_similarity(sims: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor) -> torch.Tensor:
    """SigLIP-style logits from cosine similarities: ``score_scale(logit_scale) * sims + logit_bias``."""
    return score_scale(logit_scale) * sims + logit_bias
