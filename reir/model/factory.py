"""Model registry: presets (``presets/<name>.json``) and saved checkpoints, one entry point."""

from __future__ import annotations

import copy
import json
import os
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .configuration import ReirConfig
from .modeling import WEIGHTS_NAME, ReirModel
from .processing import ReirProcessor
from .towers import resolve_model_path

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_SECTIONS = ("vision", "text", "more", "loss", "rerank", "image_retrieval")
# Convenience aliases for the overrides passed most often (local HF tower directories).
_ALIASES = {
    "vision_model_path": ("vision", "model_path"),
    "text_model_path": ("text", "model_path"),
    "text_encoder_path": ("text", "model_path"),
}


def list_models() -> list[str]:
    """Names of the built-in presets."""
    files = resources.files("reir.model").joinpath("presets").iterdir()
    return sorted(f.name[: -len(".json")] for f in files if f.name.endswith(".json"))


def load_preset(name: str) -> dict[str, Any]:
    """The ``ReirConfig`` kwargs of preset ``name``."""
    if name not in list_models():
        raise ValueError(f"unknown model {name!r}; presets: {list_models()} (or pass a checkpoint dir)")
    text = resources.files("reir.model").joinpath("presets", f"{name}.json").read_text()
    return dict(json.loads(text)["config"])


def apply_overrides(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Merge ``overrides`` into ReirConfig kwargs.

    Accepted forms: a top-level key (``embed_dim=64``), a section dict merged key by key
    (``vision={"num_layers": 3}``), ``section__field`` (``vision__num_layers=3``) and the
    aliases ``vision_model_path`` / ``text_model_path`` / ``text_encoder_path``.
    """
    out = copy.deepcopy(config)
    for key, value in overrides.items():
        if key in _ALIASES:
            section, field = _ALIASES[key]
            out.setdefault(section, {})[field] = value
            # A local tower dir implies the HF tower kind (the only one read from disk).
            if section == "text":
                out[section]["encoder"] = "hf"
            else:
                out[section]["backbone"] = "siglip"
        elif "__" in key:
            section, field = key.split("__", 1)
            if section not in _SECTIONS:
                raise ValueError(f"unknown config section {section!r} in override {key!r}")
            out.setdefault(section, {})[field] = value
        elif key in _SECTIONS and isinstance(value, dict):
            out.setdefault(key, {}).update(value)
        else:
            out[key] = value
    ReirConfig(**out)  # validate early: unknown sub-config keys raise here
    return out


def _resolve_packaged(kwargs: dict[str, Any]) -> None:
    """``model_path: "packaged:NAME"`` (e.g. preset ``small-minilm``) -> the pip package's directory."""
    for section in ("vision", "text"):
        spec = kwargs.get(section) or {}
        if spec.get("model_path"):
            spec["model_path"] = resolve_model_path(spec["model_path"], field=f"{section}.model_path")


def _is_checkpoint(name_or_path: str | os.PathLike[str]) -> bool:
    path = Path(name_or_path)
    return path.is_dir() and (path / WEIGHTS_NAME).is_file() and (path / "config.json").is_file()


def _build_tokenizer(config: ReirConfig) -> PreTrainedTokenizerBase:
    from .tokenization import build_tokenizer

    text = config.text_spec
    if text.encoder == "bert":
        return build_tokenizer(text.max_length)
    if not text.model_path:
        raise ValueError("text.encoder='hf' needs text.model_path (text_model_path=...) to find its tokenizer")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(text.model_path)


def create_model(
    name_or_path: str | os.PathLike[str], *, vision_only: bool = False, **overrides: Any
) -> tuple[ReirModel, ReirProcessor]:
    """Build ``(model, processor)`` from a preset name or a saved checkpoint directory.

    A preset gives a freshly initialized model (HF towers read from the local dirs given in
    its config/overrides, never downloaded). A checkpoint directory (written by
    ``model.save_pretrained`` + ``processor.save_pretrained``) loads weights and tokenizer;
    ``overrides`` are not allowed there since they could not match the stored weights.

    ``vision_only`` (checkpoints only): the image side of the model and a processor without
    a tokenizer, for processes that only encode images (the ingestion encoders). A
    conv-backbone checkpoint then loads without transformers' modeling code.
    """
    if _is_checkpoint(name_or_path):
        if overrides:
            raise ValueError(f"overrides {sorted(overrides)} cannot be applied to a saved checkpoint")
        return (ReirModel.from_pretrained(name_or_path, vision_only=vision_only),
                ReirProcessor.from_pretrained(name_or_path, tokenizer=not vision_only))  # fmt: skip
    if vision_only:
        raise ValueError(f"vision_only loads a saved checkpoint; {str(name_or_path)!r} is not one")
    name = str(name_or_path)
    kwargs = apply_overrides(load_preset(name), overrides)
    kwargs["preset"] = name
    _resolve_packaged(kwargs)
    text = kwargs.setdefault("text", {})
    if text.get("encoder", "bert") == "bert":
        from .tokenization import build_vocab

        text["vocab_size"] = len(build_vocab())
    config = ReirConfig(**kwargs)
    tokenizer = _build_tokenizer(config)
    model = ReirModel(config)
    # Build the processor after the model: a SigLIP tower may set the image size.
    return model, ReirProcessor.from_config(model.config, tokenizer)
