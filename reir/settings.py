"""Every command's configuration, built one way (docs/configuration.md).

Precedence, lowest to highest: the config class's defaults < the command's own defaults
(:attr:`CommandSpec.defaults`) < the YAML file (``--config PATH`` or ``$REIR_CONFIG``; flat
for one command, or sections per command beside shared keys such as ``milvus:``) <
``REIR_*`` environment variables (``__`` nests: ``REIR_MILVUS__URI``) < the flags given on
the command line. :data:`COMMANDS` is also the source of the generated reference table,
so a flag, key or default cannot change without the doc's test noticing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from reir.platform.config import (
    LIVE_ALIAS,
    SECTIONS,
    IngestConfig,
    MilvusConfig,
    ServeConfig,
    config_path,
    is_sectioned,
    load_config,
    read_live_alias,
    read_yaml,
)


class _Settings(BaseModel):
    # Unknown keys are errors, as in every other config class.
    model_config = ConfigDict(extra="forbid", frozen=True)


def _live_milvus() -> MilvusConfig:
    return MilvusConfig(collection=LIVE_ALIAS)


class IndexConfig(_Settings):
    """``reir index list/promote/rollback/drop``: which Milvus, which serving alias."""

    milvus: MilvusConfig = Field(default_factory=MilvusConfig)
    alias: str = Field(default=LIVE_ALIAS, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")


class SearchConfig(_Settings):
    """``reir search``: the client side of a running service."""

    url: str = "http://127.0.0.1:8000"
    top_k: int = Field(default=5, ge=1, le=1000)
    api_key: str | None = Field(default=None, repr=False)


class EvalConfig(_Settings):
    """``reir eval``: BR@k over a benchmark's queries of one split, in process or over HTTP.

    The queries come from ``data_root/reircoco.json`` or, with ``annotations``, from that
    REIRCOCO file (its ``file_name``s relative to ``data_root`` when set, else to the file's
    folder), as ``reir ingest --annotations`` reads its gallery.
    """

    data_root: Path | None = None
    annotations: Path | None = None
    split: str = Field(default="test", min_length=1)
    model_path: str
    milvus: MilvusConfig = Field(default_factory=_live_milvus)
    url: str | None = None
    out: Path | None = None

    @field_validator("milvus", mode="before")
    @classmethod
    def _read_live_alias(cls, value: Any) -> Any:
        # As in ServeConfig: REIR_MILVUS__URI alone still reads the live alias.
        return read_live_alias(value)

    @model_validator(mode="after")
    def _has_queries(self) -> EvalConfig:
        if self.data_root is None and self.annotations is None:
            raise ValueError("no queries: set data_root (--data) or annotations (--annotations)")
        return self


# Minutes a reference 2-core machine takes for the demo's stage steps (reir.demo.DemoConfig.
# stage_steps): stage 1, stage 2, the re-ranker then discover mode's presence head (600 / 940 /
# 1,800 + 1,000 steps since 2026-11-29; stage-1/2 steps of ~0.32-0.36 s, re-ranker ~0.2 s, presence
# head ~0.1 s, each stage's start-up and the re-ranker's features included). Their sum is the
# demo's default training minutes. Earlier splits and what they gave: docs/decisions.md ("The
# demo's time split").
DEMO_STAGE_MINUTES = (3.5, 5.5, 8.0)
DEMO_REFERENCE_MINUTES = sum(DEMO_STAGE_MINUTES)


class DemoSettings(_Settings):
    """``reir demo``: the settings a user may change (reir.demo.DemoConfig holds the rest)."""

    out: str = "demo_out"
    num_images: int = Field(default=2000, ge=20, description="images generated, train + test")
    test_images: int | None = Field(default=None, ge=1, description="of them in the test split: the gallery and "
                                    "the queries the run is scored on (default: 400, at most a fifth of num_images)")
    rerank_extra_images: int | None = Field(default=None, ge=0, description="more training images, generated "
                                            "apart, for the re-ranker's stage alone (stages 1 and 2 never see them; "
                                            "default: as many as the train split holds, at most 1,000); 0: none")
    stage_extra_images: int | None = Field(default=None, ge=0, description="more training images, generated apart, "
                                           "for stages 1 and 2 alone (the re-ranker trains on the train split and its own "
                                           "extra images; default: as many as the train split holds, at most 1,000); 0: none")
    train_minutes: float = Field(default=DEMO_REFERENCE_MINUTES, ge=0.2)
    fixed_steps: bool = Field(default=True, description="train each stage for the steps a reference 2-core machine "
                              "reaches in its minutes (scaled with train_minutes), stopping at twice the minutes at "
                              "the latest (and, with keep_budget, when the run's budget runs out); false: the "
                              "minutes alone")
    keep_budget: bool = Field(default=True, description="with fixed_steps, each stage also stops when its share of "
                              "the time left before the run's budget (the training minutes + 3) is spent: a slower "
                              "machine trains fewer steps instead of overrunning; false: the steps, up to twice the "
                              "minutes")
    model: str = "small"
    seed: int = 0
    lookalike_partners: int = Field(default=0, ge=0)


def _train_config() -> type[BaseModel]:
    from reir.training.config import TrainConfig  # the training package stays out of platform imports

    return TrainConfig


@dataclass(frozen=True)
class CommandSpec:
    """One command: its config class, which flag sets which key, and its own defaults.

    ``flags``: CLI parameter name -> dotted config key (a ``(key, note)`` pair where the
    flag's value is converted, e.g. minutes to seconds).
    """

    name: str
    config: type[BaseModel] | None
    flags: Mapping[str, str | tuple[str, str]]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    cli: tuple[str, ...] = ()  # the click command paths whose flags are listed
    notes: Mapping[str, str] = field(default_factory=dict)  # defaults the command computes (table text)

    def config_class(self) -> type[BaseModel]:
        return self.config if self.config is not None else _train_config()

    def key(self, param: str) -> str:
        target = self.flags[param]
        return target if isinstance(target, str) else target[0]


_MILVUS_FLAGS: dict[str, str | tuple[str, str]] = {"milvus_uri": "milvus.uri", "collection": "milvus.collection"}

COMMANDS: dict[str, CommandSpec] = {
    spec.name: spec
    for spec in (
        CommandSpec("train", None, {
            "data": "data_root", "stage": "stage", "model": "model", "out": "output_dir", "name": "run_name",
            "workers": "num_workers", "cpus_per_worker": "cpus_per_worker", "gpu": "use_gpu", "epochs": "epochs",
            "max_steps": "max_steps", "minutes": ("time_budget_s", "minutes x 60"), "batch_size": "batch_size",
            "lr": "lr", "zero": "zero_stage", "checkpoint_every": "checkpoint_every", "resume": "resume",
            "max_failures": "max_failures", "eval_every": "eval_every", "lookalike_partners": "lookalike_partners",
            "source": ("sources", "KIND:PATH[:WEIGHT], repeat")},
            notes={"run_name": "`reir-stage{N}` (stages 1, 2), `reir-{stage}`"}),
        CommandSpec("ingest", IngestConfig, {
            "gallery": "gallery_root", "manifest": "manifest", "annotations": "annotations",
            "model_dir": "model_path", **_MILVUS_FLAGS, "alias": "alias", "no_alias": ("alias", "sets none"),
            "rebuild": "rebuild", "full": ("incremental", "sets false"), "split": "split",
            "encoders": "num_encoders", "batch_size": "batch_size", "top_k_instances": "top_k_instances",
            "min_instance_score": "min_instance_score", "index_type": "milvus.index_type",
            "metadata_field": ("milvus.metadata_fields", "NAME:TYPE, repeat"), "device": "device",
            "dead_letter": "dead_letter_path", "object_store_mb": ("object_store_memory_limit", "MiB")},
            defaults={"alias": LIVE_ALIAS, "batch_size": 32}),
        CommandSpec("serve", ServeConfig, {"model_dir": "model_path", **_MILVUS_FLAGS, "port": "port", "host": "host"}),
        CommandSpec("search", SearchConfig, {"url": "url", "top_k": "top_k", "api_key": "api_key"}),
        CommandSpec("eval", EvalConfig, {"data": "data_root", "annotations": "annotations", "split": "split",
                                         "model_dir": "model_path", **_MILVUS_FLAGS, "url": "url", "out": "out"}),
        CommandSpec("index", IndexConfig, {"milvus_uri": "milvus.uri", "alias": "alias"},
                    cli=("index list", "index promote", "index rollback", "index drop")),
        CommandSpec("demo", DemoSettings, {"out": "out", "num_images": "num_images",
                                           "test_images": "test_images", "extra_images": "rerank_extra_images",
                                           "stage_extra_images": "stage_extra_images",
                                           "minutes": "train_minutes",
                                           "model": "model", "seed": "seed",
                                           "lookalike_partners": "lookalike_partners"}),
    )
}


def _check_shared_keys(data: Mapping[str, Any]) -> None:
    """A shared key of a sectioned file must belong to some command (a typo is an error)."""
    known = {name for spec in COMMANDS.values() for name in spec.config_class().model_fields}
    unknown = sorted(k for k in data if k not in SECTIONS and k not in known)
    if unknown:
        raise ValueError(f"config file: unknown top-level key(s) {unknown}; sections are {', '.join(SECTIONS)}")


def command_config(
    command: str,
    *,
    config: str | Path | None = None,
    flags: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> Any:
    """``command``'s config object.

    ``flags``: CLI parameter name -> value, ``None`` meaning not given (so a file or the
    environment can set it). ``extra``: dotted keys set by flags whose meaning is not a plain
    value (``--no-alias``), applied last. ``env`` defaults to ``os.environ``.
    """
    spec = COMMANDS[command]
    cls = spec.config_class()
    overrides = {spec.key(name): value for name, value in (flags or {}).items() if value is not None}
    overrides.update(extra or {})
    path = config_path(config, env)
    data = None
    if path is not None:
        data = read_yaml(path)
        if is_sectioned(data):
            _check_shared_keys(data)
    return load_config(cls, data, overrides, env=env, section=command, defaults=spec.defaults)


# --- the reference table (docs/configuration.md) ----------------------------------------------


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if not getattr(annotation, "__args__", None) else None
    text = text or str(annotation)
    for noise in ("typing.", "pathlib.", "reir.platform.config.", "reir.training.config.", "<class '", "'>"):
        text = text.replace(noise, "")
    return text.replace("|", "\\|")


def _default_text(value: Any) -> str:
    if value is None or value == "":
        return "-" if value is None else '""'
    return f"`{value}`" if not isinstance(value, (dict, list, tuple)) or value else f"`{value!r}`"


def _rows(cls: type[BaseModel], prefix: str, defaults: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    for name, info in cls.model_fields.items():
        key = prefix + name
        sub = info.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            built = info.get_default(call_default_factory=True)
            sub_defaults = {k: getattr(built, k) for k in sub.model_fields} if built is not None else {}
            sub_defaults.update({k[len(key) + 1 :]: v for k, v in defaults.items() if k.startswith(key + ".")})
            rows += _rows(sub, key + ".", {f"{key}.{k}": v for k, v in sub_defaults.items()})
            continue
        if key in defaults:
            default = _default_text(defaults[key])
        elif info.is_required():
            default = "required"
        else:
            default = _default_text(info.get_default(call_default_factory=True))
        rows.append((key, _type_name(sub), default))
    return rows


def _flag_names(spec: CommandSpec) -> dict[str, list[str]]:
    """dotted key -> the flags that set it, read from the real click commands."""
    import typer

    from reir.cli import app

    root: Any = typer.main.get_command(app)
    out: dict[str, list[str]] = {}
    for path in spec.cli or (spec.name,):
        command = root
        for part in path.split():
            command = command.commands[part]
        for param in command.params:
            if param.name not in spec.flags or not getattr(param, "opts", None):
                continue
            target = spec.flags[param.name]
            label = "/".join(o for o in param.opts if o.startswith("--"))
            if not isinstance(target, str):
                label = f"{label} ({target[1]})"
            names = out.setdefault(spec.key(param.name), [])
            if label not in names:
                names.append(label)
    return out


def reference_table() -> str:
    """The Markdown reference of every command's keys (what docs/configuration.md embeds)."""
    parts: list[str] = []
    for spec in COMMANDS.values():
        flags = _flag_names(spec)
        cls = spec.config_class()
        parts += [f"### `reir {spec.name}` ({cls.__name__}, section `{spec.name}:`)", "",
                  "| key | type | default | environment | flag |", "|---|---|---|---|---|"]
        for key, type_name, default in _rows(cls, "", spec.defaults):
            default = spec.notes.get(key, default)
            env = "REIR_" + key.upper().replace(".", "__")
            flag = ", ".join(f"`{f}`" for f in flags.get(key, [])) or "-"
            parts.append(f"| `{key}` | {type_name} | {default} | `{env}` | {flag} |")
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"


BEGIN = "<!-- BEGIN GENERATED: python -m reir.settings docs/configuration.md -->"
END = "<!-- END GENERATED -->"


def render_doc(text: str) -> str:
    """``text`` with the block between :data:`BEGIN` and :data:`END` regenerated."""
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n\n{reference_table()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    """``python -m reir.settings DOC [--check]``: rewrite (or check) the generated table."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    (doc,) = [a for a in args if a != "--check"]
    path = Path(doc)
    current = path.read_text()
    fresh = render_doc(current)
    if check:
        return 0 if fresh == current else 1
    path.write_text(fresh)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
