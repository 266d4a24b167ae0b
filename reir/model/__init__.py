"""reir.model: the REIR dual-stream model (pure torch + transformers).

Public API (see ``docs/interfaces.md``): :func:`create_model`, :func:`list_models`,
:class:`ReirModel`, :class:`ReirProcessor`, :class:`ReirCriterion` and their data types.
"""

from __future__ import annotations

from .boxes import BoxMode, convert, iou_xywh
from .configuration import LossSpec, MoreSpec, ReirConfig, TextSpec, VisionSpec
from .factory import create_model, list_models
from .losses import ReirCriterion, hungarian_match, siglip_pair_loss
from .modeling import InstanceOutput, ReirModel, ReirOutput, TextOutput
from .processing import Instance, ReirProcessor, TrainBatch, swap_left_right, swap_top_bottom

__all__ = [
    "BoxMode",
    "Instance",
    "InstanceOutput",
    "LossSpec",
    "MoreSpec",
    "ReirConfig",
    "ReirCriterion",
    "ReirModel",
    "ReirOutput",
    "ReirProcessor",
    "TextOutput",
    "TextSpec",
    "TrainBatch",
    "VisionSpec",
    "convert",
    "create_model",
    "hungarian_match",
    "iou_xywh",
    "list_models",
    "siglip_pair_loss",
    "swap_left_right",
    "swap_top_bottom",
]
