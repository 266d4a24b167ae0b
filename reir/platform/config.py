"""Typed configuration for the runtime pieces, and the one function that reads the environment.

Configs are built once at an entry point (CLI, ``build_app``) with :func:`load_config`
and then passed down as values; nothing else in ``reir.platform`` / ``reir.ingestion`` /
``reir.serving`` reads environment variables. Precedence (lowest to highest):
model defaults < YAML file < ``REIR_*`` environment variables < explicit overrides.

Environment variables map onto fields with ``__`` as the nesting separator, e.g.
``REIR_MILVUS__URI=http://127.0.0.1:19530`` or ``REIR_BATCH_SIZE=32``. Overrides are a
flat dict whose keys may be dotted (``{"milvus.uri": ...}``) or nested dicts.

The YAML file is either one command's settings (flat) or a file of sections, one per
command (``ingest:``, ``serve:``, ...) beside shared top-level keys (``milvus:``) that
apply to every command whose config has that field. ``REIR_CONFIG`` names the file when
no ``--config`` is given, so a pod that mounts it needs no flag (docs/configuration.md).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

IndexType = Literal["AUTOINDEX", "FLAT", "HNSW", "IVF_FLAT"]
MetadataType = Literal["str", "int", "float", "bool"]
ENV_PREFIX = "REIR_"
CONFIG_ENV = "REIR_CONFIG"
# The one milvus-lite default, shared by every command (what `reir ingest` writes `reir serve` reads).
DEFAULT_MILVUS_URI = "reir.db"
# Top-level keys that make a YAML file a file of per-command sections.
SECTIONS = ("train", "ingest", "serve", "search", "eval", "index", "demo")
# The serving alias a versioned ingestion promotes, and the collection name used before
# aliases existed (what a searcher falls back to when the alias is absent).
LIVE_ALIAS = "reir_live"
LEGACY_COLLECTION = "reir_instances"


class _Frozen(BaseModel):
    # Unknown keys are errors so a typo in YAML/CLI never silently falls back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class MilvusConfig(_Frozen):
    """Where instance rows live. ``uri``: a milvus-lite ``.db`` path or ``http://host:port``."""

    uri: str = DEFAULT_MILVUS_URI
    collection: str = Field(default="reir_instances", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
    token: str = Field(default="", repr=False)
    index_type: IndexType = "AUTOINDEX"
    index_params: dict[str, Any] = Field(default_factory=dict)
    search_params: dict[str, Any] = Field(default_factory=dict)
    upsert_batch_size: int = Field(default=512, ge=1, le=10_000)
    # Typed scalar columns of the collection (fixed when it is created), usable in filters.
    metadata_fields: dict[str, MetadataType] = Field(default_factory=dict)
    # Read this collection when ``collection`` (an alias) does not exist (backwards compatibility).
    fallback_collection: str | None = None

    @model_validator(mode="after")
    def _live_alias_falls_back(self) -> MilvusConfig:
        # Reading the live alias where only a pre-alias index exists keeps working.
        if self.collection == LIVE_ALIAS and self.fallback_collection is None:
            object.__setattr__(self, "fallback_collection", LEGACY_COLLECTION)
        return self

    @property
    def is_lite_file(self) -> bool:
        """A local milvus-lite data path, which only one process at a time may open."""
        return self.uri.endswith(".db")


class IngestConfig(_Frozen):
    """Offline gallery encoding into Milvus.

    Gallery sources (exactly one): ``gallery_root`` (a synthetic benchmark dir with
    ``images/{split}/*.jpg`` when ``split`` is set and that folder exists, else any
    directory of images, searched recursively), ``image_list`` (JSON lines
    ``{"image_id", "uri"}``), ``manifest`` (jsonl / csv / parquet with a ``uri`` column,
    optional ``image_id`` and the declared ``milvus.metadata_fields`` columns; a local path
    or a pyarrow filesystem URI) or ``annotations`` (a COCO instances or REIRCOCO json;
    ``file_name`` is relative to ``annotations_root``, default the json's directory).
    ``annotations`` beside another source lists nothing: its image ids (of ``split``) must be
    the gallery's (none in common: the run stops; some: a warning), or evaluation finds nothing.

    ``top_k_instances``: instances stored per image at most (ranks ``0..k-1``); a dense gallery
    needs at least its objects per image (an instance not stored is never found), within the
    model's query count (``tiny`` 64, ``small`` 256); keep the serving ``rerank_max_instances``
    as high. ``min_instance_score``: past an image's first instance, only those with this
    objectness are stored. Both default to the checkpoint's policy, the one its re-ranker
    trained on.

    ``alias`` set: a versioned build (collection ``{milvus.collection}__{model}__{time}``,
    promoted to ``alias`` after the check). ``alias`` unset: rows go to ``milvus.collection``.
    """

    gallery_root: Path | None = None
    split: str | None = "test"
    image_list: Path | None = None
    manifest: str | None = None
    annotations: Path | None = None
    annotations_root: Path | None = None
    alias: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
    rebuild: bool = False  # a fresh collection version even if one for this model exists
    check_samples: int = Field(default=5, ge=0, le=1000)  # ingested embeddings re-searched before promotion
    # Stop early (nothing promoted) when more than this fraction of the images tried so far
    # failed, once at least failure_rate_min_images were tried; 1.0 turns the guard off.
    max_failure_rate: float = Field(default=0.5, gt=0, le=1)
    failure_rate_min_images: int = Field(default=20, ge=1)
    incremental: bool = True  # skip images whose content hash is already indexed; remove deleted ones
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_gpus_per_encoder: float = Field(default=0.0, ge=0)
    max_image_pixels: int = Field(default=100_000_000, ge=1)
    object_store_memory_limit: int | None = Field(default=None, ge=1 << 20)  # bytes; Ray Data back-pressure
    max_tasks_in_flight_per_actor: int = Field(default=2, ge=1)
    # How the work is laid out on Ray Data (reir.ingestion.pipeline): "fused", one stage of
    # encoder actors that each read, decode, encode and upsert their batches (no object-store
    # hop for pixels or rows, no task per batch: the CPU plan); "staged", read tasks -> encoder
    # actors -> write tasks (the GPU plan: the CPU work beside the model runs on other cores);
    # "auto": fused on CPU, staged on GPU.
    pipeline: Literal["auto", "fused", "staged"] = "auto"
    # Staged plan: decode images in the read tasks, at the model's input size (JPEG draft mode),
    # beside the encoders; off (or a checkpoint without a reir processor config): the encoder
    # actors decode. The fused plan always decodes in the actors, at the input size when known.
    decode_in_reader: bool = True
    progress_interval_s: float = Field(default=10.0, gt=0)  # how often the run's progress is shown
    model_path: str
    milvus: MilvusConfig = Field(default_factory=MilvusConfig)
    batch_size: int = Field(default=16, ge=1, le=4096)
    # Encoder actors; None: one per GPU, or on CPU one per num_cpus_per_encoder the cluster has
    # left (see reir.ingestion.pipeline.plan_resources).
    num_encoders: int | None = Field(default=None, ge=1, le=256)
    num_cpus_per_encoder: float = Field(default=1.0, gt=0)
    # Custom Ray resources each encoder actor asks for, e.g. {"encode": 1} to keep the actors on
    # the nodes that offer it (a GPU pool, nodes near the gallery); docs/multi-node.md.
    encoder_resources: dict[str, float] = Field(default_factory=dict)
    num_cpus_per_reader: float = Field(default=0.25, gt=0)
    # Read (+ decode) tasks at once; None: the cluster's CPUs left by the encoders and writers.
    read_concurrency: int | None = Field(default=None, ge=1)
    num_cpus_per_writer: float = Field(default=0.25, gt=0)
    write_concurrency: int = Field(default=2, ge=1)
    # Stored instances per image at most, and the objectness floor past an image's first (see
    # above); None: the checkpoint's own (preprocessor_config.json: the policy its re-ranker
    # trained on; 16 and 0.1 for a new model, 10 and none for one from before 2026-11-29).
    top_k_instances: int | None = Field(default=None, ge=1, le=1000)
    min_instance_score: float | None = Field(default=None, ge=0, lt=1)
    nms_iou: float = Field(default=0.7, gt=0, le=1)
    limit: int | None = Field(default=None, ge=1)
    build_index: bool = True
    dead_letter_path: Path | None = None

    @model_validator(mode="after")
    def _one_source(self) -> IngestConfig:
        listers = sum(s is not None for s in (self.gallery_root, self.image_list, self.manifest))
        if listers > 1 or (listers == 0 and self.annotations is None):
            raise ValueError("set exactly one of gallery_root, image_list, manifest or annotations "
                             "(annotations may accompany one of the others: its image ids are then checked)")
        return self

    @property
    def annotations_check_only(self) -> bool:
        """``annotations`` names the ground truth whose ids the listed gallery must share."""
        return self.annotations is not None and any(
            s is not None for s in (self.gallery_root, self.image_list, self.manifest))


class AutoscalingSpec(_Frozen):
    """Ray Serve ``autoscaling_config`` for one deployment (replaces its fixed replica count)."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    initial_replicas: int | None = Field(default=None, ge=0)
    target_ongoing_requests: float = Field(default=2.0, gt=0)
    upscale_delay_s: float = Field(default=30.0, ge=0)
    downscale_delay_s: float = Field(default=600.0, ge=0)
    # None = Ray's defaults (Ray deprecates metrics_interval_s in favour of env variables).
    metrics_interval_s: float | None = Field(default=None, gt=0)
    look_back_period_s: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        return self


class ApiKeySpec(_Frozen):
    """One API key, stored as the sha256 hex of the key (never the key itself)."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", repr=False)
    scopes: tuple[Literal["search", "admin"], ...] = ("search",)
    rate_per_s: float | None = Field(default=None, gt=0)
    burst: int | None = Field(default=None, ge=1)


class SecurityConfig(_Frozen):
    """API keys (inline or a mounted secret file of the same list) and per-key rate limits.

    No keys at all means auth is off (the local demo). Env: ``REIR_SECURITY__API_KEYS_FILE``.
    """

    api_keys: tuple[ApiKeySpec, ...] = ()
    api_keys_file: Path | None = None
    rate_per_s: float = Field(default=20.0, gt=0)
    burst: int = Field(default=40, ge=1)


ServeStage = Literal["ingress", "encoder", "searcher"]
# Keys of an older ServeConfig, named in the error so a config that still sets them says what to do.
_RETIRED_SERVE_KEYS = {
    "reranker_replicas": "searcher_replicas",
    "num_cpus_reranker": "num_cpus_searcher",
}


class LocalizeConfig(_Frozen):
    """The localize stage (:mod:`reir.serving.localize`): zoom on small boxes of the top results.

    A result's box is small when it covers less than ``small_area_fraction`` of its image;
    the searcher replica then reads the image (the row's ``uri``, a local path), runs the
    model on a window ``zoom_factor`` times the box, maps the referred box back and repeats
    up to ``zoom_steps`` times. Only instances overlapping the previous box by
    ``min_prior_iou`` may be chosen in a crop (a refinement, not a new pick).
    """

    enabled: bool = False
    small_area_fraction: float = Field(default=0.02, gt=0, le=1)
    zoom_factor: float = Field(default=3.0, gt=1, le=64)
    zoom_steps: int = Field(default=3, ge=1, le=10)
    max_results: int = Field(default=5, ge=1, le=1000)  # the top results that may be refined
    converge_iou: float = Field(default=0.9, gt=0, le=1)
    min_prior_iou: float = Field(default=0.3, ge=0, le=1)
    top_k_instances: int = Field(default=10, ge=1, le=1000)  # instances kept per crop (after NMS)
    max_image_pixels: int = Field(default=100_000_000, ge=1)


def read_live_alias(value: Any) -> Any:
    """A ``milvus`` mapping without a collection reads the live alias: serving (and search/eval)
    read what was promoted unless told otherwise; an old un-aliased index still serves."""
    if isinstance(value, Mapping) and "collection" not in value:
        value = {**value, "collection": LIVE_ALIAS}
    return value


class ServeConfig(_Frozen):
    """Online query serving (Ray Serve)."""

    model_path: str
    milvus: MilvusConfig = Field(default_factory=lambda: MilvusConfig(collection=LIVE_ALIAS))
    candidates: int = Field(default=100, ge=1, le=16_384)
    max_top_k: int = Field(default=100, ge=1, le=1000)
    dedupe_iou: float = Field(default=0.9, gt=0, le=1)
    route_prefix: str = "/"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    app_name: str = "reir"
    encoder_replicas: int = Field(default=1, ge=1)
    searcher_replicas: int = Field(default=1, ge=1)
    ingress_replicas: int = Field(default=1, ge=1)
    num_cpus_encoder: float = Field(default=1.0, ge=0)
    # The searcher replicas encode the query too (no QueryEncoder deployment): one Ray hop per
    # query instead of two, and no batching of concurrent queries' text forwards. The default:
    # the searcher holds the model anyway (re-ranker) and on CPU the two stages scale together
    # (2 cores: HTTP p50 32 ms instead of 54, docs/query-path.md). Turn it off to scale or
    # place the encoder apart (a GPU encoder batching many queries; the k8s RayService does).
    encode_in_searcher: bool = True
    # The ingress replicas run the whole query themselves (encode, search, re-rank: a Searcher in
    # the ingress process): one deployment, no Ray hop. It scales, and asks for CPUs, as the
    # searcher (searcher_replicas, num_cpus_searcher, autoscaling.searcher). The default: with
    # Serve's HAProxy data plane, each hop cost about 7-10 ms on 2 cores, and at 1M instances
    # this took HTTP p50 from 44 to 33 ms (docs/query-path.md). Turn it off (and
    # encode_in_searcher off) to scale the ingress, encoder and searcher apart, as the k8s
    # RayService does.
    search_in_ingress: bool = True
    # The searcher runs the ANN search, the keyed context fetch and the re-rank (model) in one replica.
    num_cpus_searcher: float = Field(default=0.5, ge=0)
    num_cpus_ingress: float = Field(default=0.25, ge=0)
    # Requests one encoder or searcher replica takes at once (the ingress: twice as many, it only
    # awaits the others); more wait at the caller. With Serve's default of 5, 32 concurrent
    # queries on one searcher at 1M ran at 8 queries/s (p50 3.7 s); with 32, at 24 (p50 1.2 s).
    max_ongoing_requests: int = Field(default=32, ge=1, le=10_000)
    # Custom Ray resources every replica asks for (pins the app to the nodes that offer them).
    replica_resources: dict[str, float] = Field(default_factory=dict)
    max_batch_size: int = Field(default=16, ge=1, le=1024)
    # 0: a lone query is encoded at once (a wait here is added to every query at low load);
    # queries that arrive while a batch runs still form the next batch.
    batch_wait_timeout_s: float = Field(default=0.0, ge=0)
    filter_model_version: bool = True
    # The searcher answers unfiltered searches (the model version's partition) from an exact
    # in-memory index of the rows' vectors (numpy, float32: 512 MB per 1M rows of dim 128),
    # loaded in the background at start and after an alias move or new rows; filtered searches,
    # and any while it loads, go to Milvus. auto: on for milvus-lite (whose search scans: ~0.8 s
    # at 1M rows), off for a Milvus server (real ANN indexes). A scope over
    # memory_index_max_rows rows stays in Milvus. docs/query-path.md has the figures.
    memory_index: Literal["auto", "on", "off"] = "auto"
    memory_index_max_rows: int = Field(default=5_000_000, ge=0)
    # From this many rows of a scope on (0: never), the index searches inverted lists (k-means,
    # about sqrt(rows) lists) instead of every row, probing as many lists as reach
    # memory_index_recall (recall@100 against exact search, calibrated at load on queries
    # drawn from the rows). Its re-rank context comes from memory too (no Milvus call).
    memory_index_ann_min_rows: int = Field(default=200_000, ge=0)
    memory_index_recall: float = Field(default=0.97, gt=0, le=1)
    # Re-rank / discovery (reir.serving.rerank); the threshold file in the checkpoint wins.
    rerank_default: bool = True
    # The head re-ranked in rank mode: the top rerank_candidates ANN hits' images. With the
    # re-ranker's instance-set layer, 100 against 50 on the 2026-11-28 demo checkpoint: BR@1/5/10
    # 55.4 / 82.0 / 88.3% against 54.2 / 78.1 / 82.8% (the own image was outside 50 for 12% of
    # queries); 200 gave 55.6 / 82.2 / 88.9% at twice the re-rank cost (docs/decisions.md).
    rerank_candidates: int = Field(default=100, ge=1, le=1000)
    # Stored instances of one image the re-ranker reads (candidates always kept); >= ingest top_k_instances.
    rerank_max_instances: int = Field(default=64, ge=1, le=1000)
    # Discover mode answers *every* image holding the object, so it searches and re-ranks a
    # wider pool than rank mode (None: rank mode's). With a re-ranker trained on discovery
    # queries, 1,000 / 1,000 held 90% of the matches against 63% for 200 / 200 (F1 0.46 vs
    # 0.41) at 103 ms per query instead of 30 (in process, the 400-image demo gallery).
    discover_candidates: int | None = Field(default=1000, ge=1, le=16_384)
    discover_rerank_candidates: int | None = Field(default=1000, ge=1, le=16_384)
    discover_threshold: float = Field(default=0.5, gt=0, lt=1)
    # Per-deployment autoscaling; a stage not listed keeps its fixed *_replicas count.
    autoscaling: dict[ServeStage, AutoscalingSpec] = Field(default_factory=dict)
    # Input limits and the filter allow-list (besides image_id, model_version, uri).
    max_query_chars: int = Field(default=500, ge=1, le=10_000)
    max_body_bytes: int = Field(default=16_384, ge=256, le=10_000_000)
    max_filters: int = Field(default=16, ge=0, le=256)
    metadata_fields: dict[str, Literal["str", "int", "float", "bool"]] = Field(default_factory=dict)
    # Folders that GET /v1/images/{image_id} may read from; empty = wherever the stored uri points.
    image_roots: tuple[Path, ...] = ()
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    localize: LocalizeConfig = Field(default_factory=LocalizeConfig)

    @field_validator("milvus", mode="before")
    @classmethod
    def _read_live_alias(cls, value: Any) -> Any:
        return read_live_alias(value)

    @model_validator(mode="before")
    @classmethod
    def _retired_keys(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            for old, new in _RETIRED_SERVE_KEYS.items():
                if old in value:
                    raise ValueError(f"{old} is gone: the Searcher deployment re-ranks now (one hop less per "
                                     f"query); set {new} instead")  # fmt: skip
            if isinstance(value.get("autoscaling"), Mapping) and "reranker" in value["autoscaling"]:
                raise ValueError("autoscaling.reranker is gone: the Searcher deployment re-ranks now; "
                                 "scale it with autoscaling.searcher")  # fmt: skip
        return value

    @model_validator(mode="after")
    def _one_deployment(self) -> ServeConfig:
        if not self.search_in_ingress:
            return self
        if not self.encode_in_searcher:
            raise ValueError("encode_in_searcher: false asks for a QueryEncoder deployment, which search_in_ingress "
                             "(one deployment) has not: set search_in_ingress: false too")  # fmt: skip
        apart = sorted(set(self.autoscaling) - {"searcher"})
        if apart or self.ingress_replicas != 1 or self.encoder_replicas != 1:
            what = ", ".join([*(f"autoscaling.{k}" for k in apart),
                              *(f"{k}_replicas" for k in ("ingress", "encoder") if getattr(self, f"{k}_replicas") != 1)])
            raise ValueError(f"with search_in_ingress one deployment does the whole query and scales as the searcher "
                             f"(searcher_replicas, autoscaling.searcher); {what} would be ignored: set "
                             f"search_in_ingress: false to scale the stages apart")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _lite_single_reader(self) -> ServeConfig:
        searcher_scaling = self.autoscaling.get("searcher")
        if self.milvus.is_lite_file and searcher_scaling is not None and searcher_scaling.max_replicas > 1:
            raise ValueError("a milvus-lite .db file can be opened by one process only; searcher max_replicas must be 1")
        if self.milvus.is_lite_file and self.searcher_replicas > 1:
            raise ValueError(
                "a milvus-lite .db file can be opened by one process only; with "
                "searcher_replicas > 1 run `milvus-lite server` (EmbeddedMilvus) and "
                "pass its http:// uri"
            )
        return self


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def _set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    keys = [k for k in dotted.split(".") if k]
    node = target
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[keys[-1]] = value


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or len(name) == len(ENV_PREFIX):
            continue
        dotted = name[len(ENV_PREFIX) :].lower().replace("__", ".")
        # YAML parsing gives env strings the same typing rules as the config file
        # ("32" -> 32, "true" -> True, "{a: 1}" -> dict).
        _set_dotted(out, dotted, yaml.safe_load(raw) if raw else raw)
    return out


def _unflatten(overrides: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        if isinstance(value, Mapping):
            out = _deep_merge(out, {key: _unflatten(value)})
        else:
            _set_dotted(out, key, value)
    return out


def config_path(explicit: str | Path | None, env: Mapping[str, str] | None = None) -> Path | None:
    """The YAML file to read: ``explicit`` (``--config``) else ``$REIR_CONFIG`` else none."""
    chosen = explicit if explicit is not None else (os.environ if env is None else env).get(CONFIG_ENV) or None
    return None if chosen is None else Path(chosen)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path``; a clear error when it is missing or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: top level must be a mapping")  # noqa: TRY004 - a config error, shown as one line
    return loaded


def is_sectioned(data: Mapping[str, Any]) -> bool:
    """A file of per-command sections (any top-level key names a command)."""
    return any(key in SECTIONS for key in data)


def select_section(data: Mapping[str, Any], section: str | None, fields: Mapping[str, Any]) -> dict[str, Any]:
    """``section``'s settings of a sectioned file over the shared keys naming one of ``fields``;
    a flat file is returned whole (a file per command)."""
    if not is_sectioned(data):
        return dict(data)
    if section is None:
        raise ValueError(f"a file of sections ({', '.join(SECTIONS)}) needs the command's section")
    own = data.get(section) or {}
    if not isinstance(own, Mapping):
        raise ValueError(f"config section {section!r} must be a mapping")  # noqa: TRY004 - as above
    shared = {k: v for k, v in data.items() if k not in SECTIONS and k in fields}
    return _deep_merge(shared, own)


def load_config(
    cls: type[ConfigT],
    yaml_path: str | Path | Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    section: str | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> ConfigT:
    """Build ``cls`` from ``defaults``, then YAML, then ``REIR_*`` env vars, then ``overrides``.

    ``defaults``: a command's own defaults where they differ from ``cls``'s (lowest layer).
    ``yaml_path``: a file, or its already parsed mapping; ``section`` picks the command's
    part of a sectioned file. ``env`` defaults to ``os.environ``; this is the only place the
    environment is read. Only env vars naming a field of ``cls`` are applied, so one
    environment can serve several config classes.
    """
    data = _unflatten(defaults or {})
    if yaml_path is not None:
        loaded = read_yaml(yaml_path) if isinstance(yaml_path, (str, Path)) else dict(yaml_path)
        data = _deep_merge(data, select_section(loaded, section, cls.model_fields))
    env_data = _env_overrides(os.environ if env is None else env)
    env_data = {k: v for k, v in env_data.items() if k in cls.model_fields}
    data = _deep_merge(data, env_data)
    data = _deep_merge(data, _unflatten(overrides or {}))
    return cls.model_validate(data)
