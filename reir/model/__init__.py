"""reir.model: the REIR dual-stream model (pure torch + transformers).

Public API (see ``docs/interfaces.md``): :func:`create_model`, :func:`list_models`,
:class:`ReirModel`, :class:`ReirProcessor`, :class:`ReirCriterion` and their data types.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

# Names are imported on first use (PEP 562): ``reir.model.images`` (decoding, in Ray Data
# read tasks) must not pay for torch and transformers, which the package's other modules need.
_EXPORTS = {
    "BoxMode": "boxes", "convert": "boxes", "iou_xywh": "boxes",
    "LossSpec": "configuration", "MoreSpec": "configuration", "ReirConfig": "configuration",
    "TextSpec": "configuration", "VisionSpec": "configuration",
    "create_model": "factory", "list_models": "factory",
    "ReirCriterion": "losses", "hungarian_match": "losses", "siglip_pair_loss": "losses",
    "InstanceOutput": "modeling", "ReirModel": "modeling", "ReirOutput": "modeling", "TextOutput": "modeling",
    "Instance": "processing", "ReirProcessor": "processing", "TrainBatch": "processing",
    "swap_left_right": "processing", "swap_top_bottom": "processing",
}  # fmt: skip

if TYPE_CHECKING:
    from .boxes import BoxMode, convert, iou_xywh
    from .configuration import LossSpec, MoreSpec, ReirConfig, TextSpec, VisionSpec
    from .factory import create_model, list_models
    from .losses import ReirCriterion, hungarian_match, siglip_pair_loss
    from .modeling import InstanceOutput, ReirModel, ReirOutput, TextOutput
    from .processing import Instance, ReirProcessor, TrainBatch, swap_left_right, swap_top_bottom


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


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
