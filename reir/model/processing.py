"""``ReirProcessor``: images and text in, model inputs out; model outputs in, instances out.

Box conventions follow :mod:`reir.model.boxes`: the model sees normalized ``cxcywh``
relative to the original image; :meth:`ReirProcessor.postprocess` returns absolute pixel
``[x, y, w, h]`` of the *original* image.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from PIL import Image

from .boxes import BoxMode, convert, cxcywh_to_xyxy, nms_xyxy
from .configuration import ReirConfig
from .modeling import InstanceOutput

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .tokenization import SpellingCorrector

PROCESSOR_NAME = "preprocessor_config.json"
# A ref's box index when the expression's referent is unknown (weak supervision: an
# (image, expression) pair without the box). Only the "weak" loss stage accepts it.
NO_REFERENT = -1
# The stored-instance policy of a new processor (ReirProcessor.postprocess): at most 16 an image
# after NMS, past the first only those with objectness >= 0.1. On the demo's test gallery
# (docs/model.md, "Stored instances") it kept 98.4% of all objects against 95.5% for a plain top
# 10, in 8.0 instances an image against 10.
INSTANCE_TOP_K, INSTANCE_MIN_SCORE, INSTANCE_MIN_KEEP = 16, 0.1, 1
LEGACY_INSTANCE_POLICY = {"instance_top_k": 10, "instance_min_score": 0.0, "instance_min_keep": 1}


def _mirror(pairs: list[tuple[str, str]]) -> tuple[dict[str, str], re.Pattern[str]]:
    """Word pairs that a flip exchanges -> the swap table and the whole-word pattern finding them."""
    table = {**dict(pairs), **{b: a for a, b in pairs}}
    return table, re.compile(r"\b(" + "|".join(table) + r")\b", re.IGNORECASE)


_LR_SWAP, _LR_PATTERN = _mirror([("left", "right"), ("leftmost", "rightmost")])
_TB_SWAP, _TB_PATTERN = _mirror([("above", "below"), ("over", "under"), ("top", "bottom"), ("topmost", "bottommost"),
                                 ("highest", "lowest"), ("upper", "lower"), ("uppermost", "lowermost")])


class SampleLike(Protocol):
    """What :meth:`ReirProcessor.collate` reads from a sample (``reir.data.ImageSample``)."""

    image_id: str
    width: int
    height: int
    boxes: list[list[float]]  # absolute [x, y, w, h]
    labels: list[int]
    refs: list[tuple[str, int]]  # (expression, index into boxes, or NO_REFERENT)
    # optional: ``scene: int``, the image's scene label for the scene probe (-1 or absent: unknown)


@dataclass
class Instance:
    """One retrievable instance of an image.

    Attributes:
        box_xywh: absolute pixel ``[x, y, w, h]`` in the original image.
        score: objectness probability in [0, 1].
        embedding: ``float32 [D]`` L2-normalized instance embedding.
        rank: 0-based position in the image's instance list (sorted by score).
    """

    box_xywh: list[float]
    score: float
    embedding: np.ndarray
    rank: int


@dataclass
class TrainBatch:
    """A collated training batch (B images, T expressions).

    Attributes:
        pixel_values: ``[B, 3, S, S]`` float.
        targets: per image ``{"boxes": [n, 4] float cxcywh normalized, "labels": [n] long,
            "scene": [1] long}`` (scene: the image's scene label, -1 unknown).
        input_ids / attention_mask: ``[T, L]`` long.
        text_image_index: ``[T]`` long, image of each expression (0..B-1).
        text_target_index: ``[T]`` long, referent's index into that image's target boxes,
            ``NO_REFERENT`` (-1) for weak rows (the weak loss stage never reads it).
        image_ids / texts: bookkeeping (not used by the losses).
    """

    pixel_values: torch.Tensor
    targets: list[dict[str, torch.Tensor]]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    text_image_index: torch.Tensor
    text_target_index: torch.Tensor
    image_ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    def to(self, device: torch.device | str) -> TrainBatch:
        move = lambda t: t.to(device, non_blocking=True)
        return replace(
            self,
            pixel_values=move(self.pixel_values),
            targets=[{k: move(v) for k, v in t.items()} for t in self.targets],
            input_ids=move(self.input_ids),
            attention_mask=move(self.attention_mask),
            text_image_index=move(self.text_image_index),
            text_target_index=move(self.text_target_index),
        )


def _swap_words(text: str, pattern: re.Pattern[str], table: dict[str, str]) -> str:
    def _swap(match: re.Match[str]) -> str:
        word = match.group(0)
        out = table[word.lower()]
        return out.capitalize() if word[0].isupper() else out

    return pattern.sub(_swap, text)


def swap_left_right(text: str) -> str:
    """Mirror horizontal spatial words (used with horizontal-flip augmentation)."""
    return _swap_words(text, _LR_PATTERN, _LR_SWAP)


def swap_top_bottom(text: str) -> str:
    """Mirror vertical spatial words, "above" / "below", "topmost" / "bottommost", "upper" /
    "lower" (used with vertical-flip augmentation)."""
    return _swap_words(text, _TB_PATTERN, _TB_SWAP)


class ReirProcessor:
    """Pre- and post-processing paired with a :class:`ReirModel` (saved in the same dir)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | None,
        *,
        image_size: int,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        max_length: int = 32,
        padding: str = "longest",
        spell_correct: bool = True,
        instance_top_k: int = INSTANCE_TOP_K,
        instance_min_score: float = INSTANCE_MIN_SCORE,
        instance_min_keep: int = INSTANCE_MIN_KEEP,
    ) -> None:
        self.tokenizer = tokenizer
        # Typos are mapped to known words before tokenizing, in training and at query time alike.
        self.spell_correct = bool(spell_correct)
        self._speller: SpellingCorrector | None = None
        if self.spell_correct and tokenizer is not None:
            from .tokenization import SpellingCorrector

            self._speller = SpellingCorrector.from_tokenizer(tokenizer)
        self.image_size = int(image_size)
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        self.max_length = int(max_length)
        self.padding = padding
        # What :meth:`postprocess` keeps of an image, as ingestion stores it and the re-ranker
        # trains on it (the rerank stage writes its own policy here): see :meth:`postprocess`.
        self.instance_top_k = int(instance_top_k)
        self.instance_min_score = float(instance_min_score)
        self.instance_min_keep = int(instance_min_keep)
        if self.instance_top_k < 1 or not 0.0 <= self.instance_min_score < 1.0 or self.instance_min_keep < 1:
            raise ValueError(f"instance policy needs instance_top_k >= 1, 0 <= instance_min_score < 1 and "
                             f"instance_min_keep >= 1; got {self.instance_top_k}, {self.instance_min_score}, "
                             f"{self.instance_min_keep}")  # fmt: skip

    @classmethod
    def from_config(cls, config: ReirConfig, tokenizer: PreTrainedTokenizerBase) -> ReirProcessor:
        vision, text = config.vision_spec, config.text_spec
        return cls(
            tokenizer,
            image_size=vision.image_size,
            image_mean=vision.image_mean,
            image_std=vision.image_std,
            max_length=text.max_length,
            padding=text.padding,
        )

    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images (any mode/size) -> ``[B, 3, S, S]`` float, resized ignoring aspect ratio."""
        size = (self.image_size, self.image_size)
        arrays = [np.asarray(im.convert("RGB").resize(size, Image.Resampling.BILINEAR), dtype=np.float32) for im in images]
        if not arrays:
            return torch.zeros(0, 3, *size)
        mean = np.asarray(self.image_mean, np.float32) * 255.0
        std = np.asarray(self.image_std, np.float32) * 255.0
        batch = (np.stack(arrays) - mean) / std  # == (x / 255 - mean) / std
        return torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32))

    def text(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Expressions -> ``{"input_ids": [T, L], "attention_mask": [T, L]}`` (long)."""
        if not texts:
            empty = torch.zeros(0, 1, dtype=torch.long)
            return {"input_ids": empty, "attention_mask": empty.clone()}
        if self._speller is not None:
            texts = [self._speller(t) for t in texts]
        enc = self._tokenizer()(
            list(texts), padding=self.padding, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Tokens each expression has before :meth:`text` cuts it at ``max_length`` (special
        tokens included): a count above ``max_length`` means the model never saw its end.

        Reported as data so the caller (the serving layer) can warn and count; :meth:`text`
        keeps its output unchanged."""
        speller = getattr(self, "_speller", None)
        prepared = [speller(t) for t in texts] if speller is not None else list(texts)
        if not prepared:
            return []
        # verbose=False: no "longer than the model's maximum" warning for a count taken on purpose
        ids = self._tokenizer()(prepared, truncation=False, verbose=False)["input_ids"]
        return [len(row) for row in ids]

    def postprocess(
        self,
        output: InstanceOutput,
        sizes: Sequence[tuple[int, int]],
        top_k: int | None = None,
        nms_iou: float = 0.7,
        min_score: float | None = None,
        min_keep: int | None = None,
    ) -> list[list[Instance]]:
        """Keep each image's instances: its queries by objectness after NMS, at most ``top_k``,
        and past the first ``min_keep`` only those with objectness ``>= min_score``. Unset,
        each is this processor's policy (``instance_top_k``, ``instance_min_score``,
        ``instance_min_keep``).

        A cap alone stores a sparse image's background as instances and cuts a dense image's
        objects; the floor with a higher cap does neither (docs/model.md, "Stored instances").
        ``sizes`` are the original ``(width, height)`` of each image; returned boxes are
        absolute pixel ``[x, y, w, h]`` in those images, clipped to their bounds.
        """
        top_k = self.instance_top_k if top_k is None else int(top_k)
        min_score = self.instance_min_score if min_score is None else float(min_score)
        min_keep = self.instance_min_keep if min_keep is None else int(min_keep)
        if len(sizes) != output.boxes.shape[0]:
            raise ValueError(f"got {len(sizes)} sizes for {output.boxes.shape[0]} images")
        probs = torch.sigmoid(output.objectness_logits.detach().float()).cpu()
        boxes = cxcywh_to_xyxy(output.boxes.detach().float().cpu()).clamp(0.0, 1.0)
        embs = output.embeddings.detach().float().cpu()
        return [
            self._postprocess_one(boxes[b], probs[b], embs[b], sizes[b], top_k, nms_iou, min_score, min_keep)
            for b in range(len(sizes))
        ]

    @staticmethod
    def _postprocess_one(
        boxes: torch.Tensor,
        probs: torch.Tensor,
        embs: torch.Tensor,
        size: tuple[int, int],
        top_k: int,
        nms_iou: float,
        min_score: float,
        min_keep: int = 1,
    ) -> list[Instance]:
        # Pre-select candidates: NMS cost grows quadratically and low scorers rarely survive.
        order = torch.argsort(probs, descending=True)[: max(10 * top_k, 100)]
        keep = order[nms_xyxy(boxes[order], probs[order], nms_iou, max_keep=top_k)]
        # NMS keeps the score order: the first min_keep stay whatever their score.
        keep = keep[(torch.arange(len(keep)) < min_keep) | (probs[keep] >= min_score)]
        width, height = float(size[0]), float(size[1])
        xywh = convert(boxes[keep].double().numpy(), BoxMode.XYXY_NORM, BoxMode.XYWH_ABS, width=width, height=height)
        return [
            Instance(
                box_xywh=[float(v) for v in xywh[i]],
                score=float(probs[q]),
                embedding=embs[q].numpy().astype(np.float32, copy=True),
                rank=i,
            )
            for i, q in enumerate(keep.tolist())
        ]

    def collate(
        self,
        samples: Sequence[SampleLike],
        images: Sequence[Image.Image],
        *,
        hflip_prob: float = 0.0,
        vflip_prob: float = 0.0,
        rng: random.Random | None = None,
        max_refs_per_image: int | None = None,
    ) -> TrainBatch:
        """Build a :class:`TrainBatch`; optionally flip images horizontally with ``hflip_prob``
        (boxes mirrored, "left"/"right" swapped in expressions) and vertically with
        ``vflip_prob`` ("above"/"below", "topmost"/"bottommost" swapped): only for images
        without a natural up, such as the synthetic scenes or aerial views. An image with more
        than ``max_refs_per_image`` expressions (several phrasings of each referent) gives a
        random subset of them, so a step's text count stays bounded."""
        if len(samples) != len(images):
            raise ValueError(f"{len(samples)} samples but {len(images)} images")
        rng = rng or random.Random()
        pil: list[Image.Image] = []
        targets: list[dict[str, torch.Tensor]] = []
        texts: list[str] = []
        img_idx: list[int] = []
        tgt_idx: list[int] = []
        for i, (sample, image) in enumerate(zip(samples, images)):
            hflip = hflip_prob > 0 and rng.random() < hflip_prob
            vflip = vflip_prob > 0 and rng.random() < vflip_prob
            boxes = np.array(sample.boxes, dtype=np.float64).reshape(-1, 4)  # a copy: flips write into it
            if hflip:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                boxes[:, 0] = sample.width - boxes[:, 0] - boxes[:, 2]
            if vflip:
                image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
                boxes[:, 1] = sample.height - boxes[:, 1] - boxes[:, 3]
            norm = convert(boxes, BoxMode.XYWH_ABS, BoxMode.CXCYWH_NORM, width=sample.width, height=sample.height)
            targets.append(
                {
                    "boxes": torch.as_tensor(norm, dtype=torch.float32).reshape(-1, 4),
                    "labels": torch.as_tensor(list(sample.labels), dtype=torch.long),
                    "scene": torch.as_tensor([getattr(sample, "scene", -1)], dtype=torch.long),
                }
            )
            pil.append(image)
            refs = list(sample.refs)
            if max_refs_per_image is not None and len(refs) > max_refs_per_image:
                refs = rng.sample(refs, max_refs_per_image)
            for text, box_index in refs:
                text = swap_left_right(text) if hflip else text
                texts.append(swap_top_bottom(text) if vflip else text)
                img_idx.append(i)
                tgt_idx.append(int(box_index))
        enc = self.text(texts)
        return TrainBatch(
            pixel_values=self.images(pil),
            targets=targets,
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            text_image_index=torch.as_tensor(img_idx, dtype=torch.long),
            text_target_index=torch.as_tensor(tgt_idx, dtype=torch.long),
            image_ids=[s.image_id for s in samples],
            texts=texts,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "processor_class": type(self).__name__,
            "image_size": self.image_size,
            "image_mean": self.image_mean,
            "image_std": self.image_std,
            "max_length": self.max_length,
            "padding": self.padding,
            "spell_correct": self.spell_correct,
            "instance_top_k": self.instance_top_k,
            "instance_min_score": self.instance_min_score,
            "instance_min_keep": self.instance_min_keep,
        }

    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> None:
        """Write ``preprocessor_config.json`` and the tokenizer files into ``save_directory``."""
        tokenizer = self._tokenizer()
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / PROCESSOR_NAME).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tokenizer.save_pretrained(str(path))

    def _tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            raise ValueError("this processor was loaded with tokenizer=False: it prepares images, not text")
        return self.tokenizer

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str], *, tokenizer: bool = True) -> ReirProcessor:
        """Load what :meth:`save_pretrained` wrote; ``tokenizer=False`` leaves the tokenizer out
        (an image-only processor, as the ingestion encoders use)."""
        path = Path(directory)
        cfg = json.loads((path / PROCESSOR_NAME).read_text())
        cfg.pop("processor_class", None)
        # A checkpoint from before the policy was saved stored its top 10, whatever their score.
        for key, old in LEGACY_INSTANCE_POLICY.items():
            cfg.setdefault(key, old)
        if not tokenizer:
            return cls(None, **cfg)
        from transformers import AutoTokenizer

        # Hand AutoTokenizer the model's own config: left to itself it reads config.json
        # through the base PretrainedConfig and warns about the unknown "reir" model type.
        config = ReirConfig.from_pretrained(str(path)) if (path / "config.json").is_file() else None
        return cls(AutoTokenizer.from_pretrained(str(path), config=config), **cfg)
