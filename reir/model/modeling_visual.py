"""Visual branch building blocks: backbones, positional encodings and per-token heads.

The visual branch never sees text. Every token of the final grid is an instance
query: it predicts objectness, a box and an instance embedding (dense set prediction).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from .configuration import VisionSpec

if TYPE_CHECKING:
    from transformers import PreTrainedModel

CNN_STRIDE = 8


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(eps, 1 - eps)
    return torch.log(x / (1 - x))


def sine_position_2d(grid: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2D sine embedding of a ``grid x grid`` raster, row-major: ``[grid*grid, dim]``."""
    if dim % 4:
        raise ValueError(f"positional dim must be divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    coords = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid * 2 * math.pi
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    ax = xs.reshape(-1, 1) * omega
    ay = ys.reshape(-1, 1) * omega
    return torch.cat([ax.sin(), ax.cos(), ay.sin(), ay.cos()], dim=1)


def box_sine_encoding(boxes: torch.Tensor, freqs: int) -> torch.Tensor:
    """Encode cxcywh boxes ``[..., 4]`` in [0,1] as ``[..., 4 * 2 * freqs]`` sines/cosines."""
    scales = (2.0 ** torch.arange(freqs, device=boxes.device, dtype=boxes.dtype)) * math.pi
    angles = boxes[..., None] * scales  # [..., 4, freqs]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)


def grid_cell_centers(grid: int) -> torch.Tensor:
    """Normalized (cx, cy) of each cell of a row-major ``grid x grid`` raster: ``[grid*grid, 2]``."""
    coords = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)


class Mlp(nn.Sequential):
    """``num_layers`` linear layers with GELU between them."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int = 2) -> None:
        dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < num_layers - 1:
                layers.append(nn.GELU())
        super().__init__(*layers)


def _groups(channels: int) -> int:
    # GroupNorm rather than BatchNorm: batch statistics are unreliable at the small
    # per-worker batches of CPU data-parallel training and need no sync across ranks.
    return max(1, min(8, channels // 4))


class ConvNormAct(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.GroupNorm(_groups(c_out), c_out),
            nn.GELU(),
        )


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(ConvNormAct(channels, channels), ConvNormAct(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ConvBackbone(nn.Module):
    """Small conv net, stride 8: ``[B,3,S,S] -> [B, (S/8)^2, hidden]`` (row-major tokens)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        c1, c2 = max(8, hidden // 4), max(16, hidden // 2)
        self.layers = nn.Sequential(
            ConvNormAct(3, c1, stride=2),
            ConvNormAct(c1, c1),
            ConvNormAct(c1, c2, stride=2),
            ResidualBlock(c2),
            ConvNormAct(c2, hidden, stride=2),
            ResidualBlock(hidden),
        )
        self.out_channels = hidden

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.layers(pixel_values).flatten(2).transpose(1, 2)


class SiglipBackbone(nn.Module):
    """HF ``SiglipVisionModel`` patch tokens: ``[B,3,S,S] -> [B, (S/patch)^2, C]``."""

    def __init__(self, tower: PreTrainedModel) -> None:
        super().__init__()
        self.tower = tower
        self.out_channels = int(tower.config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.tower(pixel_values=pixel_values).last_hidden_state


def build_siglip_vision_tower(spec: VisionSpec, load_weights: bool) -> PreTrainedModel:
    """SigLIP vision tower from a local dir (creation) or from the stored config (reload)."""
    # transformers' modeling modules are imported here, not at module import: a conv-backbone
    # model loaded for images only (the ingestion encoders) never needs them (about 5 s a process).
    from transformers import SiglipVisionConfig, SiglipVisionModel

    if load_weights and spec.model_path:
        # The attention-pooling head is unused (we keep all patch tokens): do not build it.
        return SiglipVisionModel.from_pretrained(spec.model_path, vision_use_head=False)
    if spec.hf_config is None:
        raise ValueError("siglip backbone needs vision.model_path (a local HF dir) or vision.hf_config")
    cfg: dict[str, Any] = {k: v for k, v in spec.hf_config.items() if k != "model_type"}
    return SiglipVisionModel(SiglipVisionConfig(**cfg))


def vision_grid_size(spec: VisionSpec, backbone: nn.Module) -> int:
    if isinstance(backbone, SiglipBackbone):
        cfg: Any = backbone.tower.config
        return int(cfg.image_size) // int(cfg.patch_size)
    if spec.image_size % CNN_STRIDE:
        raise ValueError(f"image_size must be a multiple of {CNN_STRIDE}, got {spec.image_size}")
    return spec.image_size // CNN_STRIDE


class EmbeddingProbes(NamedTuple):
    """What the linear probes read from every query's instance embedding (``[B, Q, .]``)."""

    class_logits: torch.Tensor | None  # None without ``vision.num_classes``
    appearance: torch.Tensor  # the mean colour of the box's centre
    scene_logits: torch.Tensor | None  # the image's scene label; None without ``vision.num_scene_classes``


class InstanceHeads(nn.Module):
    """Per-token objectness, box and instance-embedding heads."""

    def __init__(self, spec: VisionSpec, grid: int, embed_dim: int) -> None:
        super().__init__()
        hidden = spec.hidden_size
        self.freqs = spec.geometry_freqs
        self.objectness = nn.Linear(hidden, 1)
        self.classifier = nn.Linear(hidden, spec.num_classes) if spec.num_classes > 0 else None
        self.appearance = nn.Linear(hidden, 3) if spec.appearance_head else None
        probes = spec.embedding_probes
        self.probe_class = nn.Linear(embed_dim, spec.num_classes) if probes and spec.num_classes > 0 else None
        self.probe_appearance = nn.Linear(embed_dim, 3) if probes else None
        scenes = spec.num_scene_classes
        self.probe_scene = nn.Linear(embed_dim, scenes) if probes and scenes > 0 else None
        self.box = Mlp(hidden, hidden, 4, num_layers=3)
        self.geometry = nn.Linear(4 * 2 * spec.geometry_freqs, hidden)
        # A summary of the whole image joins each instance's embedding input: expressions
        # name image-level facts ("on the striped background", "in the picture with a
        # white hexagon") that a token would otherwise have to gather through attention.
        self.context = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden))
        self.embed = Mlp(3 * hidden, 2 * hidden, embed_dim, num_layers=2)
        self.register_buffer("cell_logits", inverse_sigmoid(grid_cell_centers(grid)), persistent=False)
        prior = min(0.9, spec.box_prior_cells / grid)
        self.size_prior_logit = float(inverse_sigmoid(torch.tensor(prior)))
        self._init_weights()

    def _init_weights(self) -> None:
        # Rare-positive prior (focal-loss style) so early objectness loss is not dominated
        # by the many negative queries; zero box deltas = start at the cell with prior size.
        nn.init.constant_(self.objectness.bias, -math.log((1 - 0.01) / 0.01))
        last = self.box[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def probe(self, emb: torch.Tensor) -> EmbeddingProbes | None:
        """``emb [B, Q, D]`` -> class logits (or None), colour and scene logits (or None)
        read linearly from the embeddings; None without ``vision.embedding_probes``."""
        if self.probe_appearance is None:
            return None
        cls = self.probe_class(emb) if self.probe_class is not None else None
        scene = self.probe_scene(emb) if self.probe_scene is not None else None
        return EmbeddingProbes(cls, self.probe_appearance(emb), scene)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        obj = self.objectness(x).squeeze(-1)
        delta = self.box(x)
        # Offsets live in logit space around the cell centre: bounded to (0, 1) and
        # local at init, which converges far faster than free box regression.
        centers = torch.sigmoid(self.cell_logits + delta[..., :2])
        sizes = torch.sigmoid(self.size_prior_logit + delta[..., 2:])
        boxes = torch.cat([centers, sizes], dim=-1)
        # Geometry is detached: embedding losses must not move the boxes.
        geom = self.geometry(box_sine_encoding(boxes.detach(), self.freqs))
        context = self.context(x.mean(dim=1, keepdim=True)).expand_as(x)
        emb = self.embed(torch.cat([x, geom, context], dim=-1))
        return boxes, obj, F.normalize(emb, dim=-1)
