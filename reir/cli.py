"""The ``reir`` command line: synth, train, ingest, serve, search, eval, demo, index.

Every command fails with one clear line on stderr (no traceback): exit 2 for a usage error
(bad flags, invalid settings), exit 1 for a failure while running (a missing file, a refused
connection, a bug: its traceback goes to a file named in the line). docs/errors.md.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import typer

from reir.errors import ReirError, UsageError
from reir.limits import MAX_OFFSET, MAX_TOP_K
from reir.platform.raylocal import init_ray  # imports ray only when called

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="reir: Referring Expression Instance Retrieval (train, index, serve, evaluate).",
)


def _need_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise ReirError(f"{what} not found: {path}")
    return path


@app.command()
def synth(
    out: Path = typer.Option(..., "--out", help="output directory"),
    num_images: int = typer.Option(2000, min=10, help="images in train + test"),
    test_fraction: float = typer.Option(0.2, min=0.05, max=0.9),
    image_size: int = typer.Option(128, min=32, max=2048),
    seed: int = typer.Option(0),
    discovery_queries: int = typer.Option(100, min=0, help="discovery queries over the test gallery"),
    train_discovery_queries: int = typer.Option(
        200, min=0, help="discovery queries per chunk of training images (teach discover mode's presence decision)"),
    train_chunk: int | None = typer.Option(
        None, min=1, help="training images per chunk within which each training expression is unique "
        "(default: the test split's size, at least 50)"),
) -> None:
    """Generate the synthetic REIR benchmark (images, REIRCOCO + COCO json, discovery queries)."""
    from reir.data.synth import generate, progress_total
    from reir.progress import progress_bar

    with progress_bar("synth: draw, then plan", total=progress_total(num_images)) as advance:
        summary = generate(out, num_images=num_images, test_fraction=test_fraction, image_size=image_size,
                           seed=seed, discovery_queries=discovery_queries,
                           train_discovery_queries=train_discovery_queries, progress=advance,
                           train_chunk=train_chunk)
    typer.echo(json.dumps(_plain(summary), indent=2))


@app.command()
def train(
    data: Path | None = typer.Option(None, "--data", help="benchmark directory (reir synth --out)"),
    stage: str | None = typer.Option(None, help="1 (detection + REC) [default], 2 (CLIA), rerank (the re-ranker, "
                              "on a stage-2 model), weak (expressions without referent boxes: detection + MIL contrast), weak-rerank "
                              "(the re-ranker on a weak model, from the same pairs) or image-retrieval (the two-stage "
                              "baseline's image retriever on a frozen model; --batch-size: images per step)"),
    model: str | None = typer.Option(None, help="preset name or model directory (stage 2: stage 1's) [small]"),
    out: str | None = typer.Option(None, "--out", help="output directory or URI (s3://...) for runs [runs]"),
    name: str | None = typer.Option(None, help="run name [reir-stage{N}]"),
    workers: int | None = typer.Option(None, min=1, help="Ray Train workers [1]"),
    cpus_per_worker: float | None = typer.Option(None, min=0.1, help="CPUs (= torch threads) per worker [1]"),
    gpu: bool | None = typer.Option(None, help="one GPU per worker, NCCL, bf16 [no]"),
    epochs: int | None = typer.Option(None, min=1, help="passes over the data [10]; the run stops at the "
                                         "first of --epochs (or --max-steps) and --minutes"),
    max_steps: int | None = typer.Option(None, min=1),
    minutes: float | None = typer.Option(None, min=0.05, help="time budget (raise --epochs for a longer run)"),
    batch_size: int | None = typer.Option(None, min=1, help="images per worker step [16]"),
    lr: float | None = typer.Option(None, min=0.0, help="[5e-4]"),
    zero: int | None = typer.Option(None, min=0, max=3, help="DeepSpeed ZeRO stage [2]"),
    checkpoint_every: int | None = typer.Option(None, min=1, help="resumable checkpoint every N steps [end only]"),
    resume: bool | None = typer.Option(None, help="continue the latest checkpoint of --name [no]"),
    max_failures: int | None = typer.Option(None, min=-1, help="restarts from the latest checkpoint [0]"),
    eval_every: int | None = typer.Option(None, min=1, help="held-out BR@k / REC Acc every N steps [off]"),
    lookalike_partners: int | None = typer.Option(
        None, min=0, help="stages 1, 2, weak: look-alike images per image in a batch (hard negatives) [0]"),
    config: Path | None = typer.Option(None, help="YAML: TrainConfig fields, or a `train:` section [$REIR_CONFIG]; "
                                       "flags given win"),
    source: list[str] = typer.Option([], "--source", help="KIND:PATH[:WEIGHT] instead of --data, repeat to mix "
                                     "by weight; KIND: synthetic, reircoco, refcoco, sorec or coco"),
) -> None:
    """Train one stage on Ray Train + DeepSpeed; prints the checkpoint directory."""
    from reir.settings import command_config
    from reir.training.config import STAGES

    if data is not None:
        _need_dir(data, "data directory")
    if stage is not None and stage not in STAGES:
        raise UsageError(f"--stage must be {', '.join(STAGES[:-1])} or {STAGES[-1]}, got {stage!r}")
    flags = {"data": str(data) if data is not None else None, "stage": stage, "model": model, "out": out,
             "name": name, "workers": workers, "cpus_per_worker": cpus_per_worker, "gpu": gpu, "epochs": epochs,
             "max_steps": max_steps, "minutes": minutes * 60 if minutes else None, "batch_size": batch_size,
             "lr": lr, "zero": zero, "checkpoint_every": checkpoint_every, "resume": resume,
             "max_failures": max_failures, "eval_every": eval_every, "lookalike_partners": lookalike_partners,
             "source": _sources(source)}
    try:
        cfg = command_config("train", config=config, flags=flags)
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        if "no training data" in str(e):
            raise UsageError("Missing option '--data' (or --source KIND:PATH[:WEIGHT])") from e
        raise
    if "run_name" not in cfg.model_fields_set:
        cfg = cfg.model_copy(update={"run_name": f"reir-stage{cfg.stage}" if cfg.stage in ("1", "2")
                                     else f"reir-{cfg.stage}"})
    from reir.training.trainer import run_training  # torch, DeepSpeed: after the checks, so a mistake answers at once

    typer.echo(str(run_training(cfg, echo=typer.echo)))


@app.command("pseudo-label")
def pseudo_label(
    data: Path = typer.Option(..., "--data", help="benchmark directory whose train referents are replaced"),
    model: Path = typer.Option(..., help="weak model directory (reir train --stage weak)"),
    out: Path = typer.Option(..., "--out", help="new benchmark directory (images are linked, not copied)"),
    keep: float = typer.Option(0.5, min=0.01, max=1.0, help="most confident fraction of the answers kept"),
    min_iou: float = typer.Option(0.5, min=0.0, max=1.0, help="an answer must cover an annotated box this well"),
) -> None:
    """Weak mode's self-training step: the weak model's answers become the train referents."""
    from reir.training.pseudo import pseudo_label as run

    _need_dir(data, "data directory")
    _need_dir(model, "model directory")
    typer.echo(json.dumps(run(model, data, out, keep=keep, min_iou=min_iou), indent=2))


# `reir ingest` and `reir index add`: the stored-instance policy (ReirProcessor.instance_*), per image
_TOP_K_HELP = ("instances stored per image at most; a dense gallery needs at least its objects per image "
               "[the model's: 16]")
_MIN_SCORE_HELP = ("objectness an instance needs to be stored, past each image's first; lower it when a model "
                   "trained on other images stores too few [the model's: 0.1]")


@app.command()
def ingest(
    gallery: Path | None = typer.Option(None, "--gallery", help="benchmark dir or a directory of images"),
    manifest: str | None = typer.Option(None, help="jsonl / csv / parquet with uri [+ image_id, metadata]"),
    annotations: Path | None = typer.Option(None, help="COCO instances or REIRCOCO json: the gallery, or beside "
                                            "--gallery/--manifest the ground truth whose image ids must be in it"),
    model_dir: Path | None = typer.Option(None, "--model", help="trained model directory (required, or model_path)"),
    milvus_uri: str | None = typer.Option(None, help="milvus-lite file, or http://host:port [reir.db]"),
    collection: str | None = typer.Option(None, help="collection (with --alias: versions' base name) [reir_instances]"),
    alias: str | None = typer.Option(None, help="serving alias promoted after a checked build [reir_live]"),
    no_alias: bool = typer.Option(False, "--no-alias", help="write straight into --collection (no versions)"),
    rebuild: bool = typer.Option(False, help="a new collection version even if one for this model exists"),
    full: bool = typer.Option(False, help="re-encode every image (not only new / changed ones)"),
    split: str | None = typer.Option(None, help="split, when --gallery is a benchmark dir or --annotations REIRCOCO "
                                     "[test]"),
    encoders: int | None = typer.Option(None, min=1, help="encoder actors [one per GPU, or per free CPU]"),
    batch_size: int | None = typer.Option(None, min=1, help="[32]"),
    top_k_instances: int | None = typer.Option(None, min=1, max=1000, help=_TOP_K_HELP),
    min_instance_score: float | None = typer.Option(None, min=0.0, max=0.999, help=_MIN_SCORE_HELP),
    index_type: str | None = typer.Option(None, help="AUTOINDEX, HNSW, IVF_FLAT or FLAT [AUTOINDEX]"),
    metadata_field: list[str] = typer.Option([], "--metadata-field", help="NAME:TYPE (str|int|float|bool), repeat"),
    device: str | None = typer.Option(None, help="auto (GPU when Ray has one), cpu or cuda [auto]"),
    dead_letter: Path | None = typer.Option(None, help="also write failed images (jsonl) here"),
    object_store_mb: int | None = typer.Option(None, min=1, help="Ray Data object store budget (MiB)"),
    config: Path | None = typer.Option(None, help="YAML: IngestConfig fields or an `ingest:` section "
                                       "[$REIR_CONFIG]; flags given win"),
) -> None:
    """Encode a gallery on a Ray Data actor pool and write one row per instance to Milvus."""
    from reir.settings import command_config

    if gallery is not None:
        _need_dir(gallery, "gallery")
    if annotations is not None and not annotations.is_file():
        raise ReirError(f"annotations file not found: {annotations}")
    flags = {"gallery": gallery, "manifest": manifest, "annotations": annotations,
             "model_dir": str(model_dir) if model_dir else None, "milvus_uri": milvus_uri, "collection": collection,
             "alias": alias, "rebuild": rebuild or None, "full": False if full else None, "split": split,
             "encoders": encoders, "batch_size": batch_size, "top_k_instances": top_k_instances,
             "min_instance_score": min_instance_score, "index_type": index_type,
             "metadata_field": dict(_metadata_field(f) for f in metadata_field) or None, "device": device,
             "dead_letter": dead_letter, "object_store_mb": object_store_mb * 2**20 if object_store_mb else None}
    cfg = command_config("ingest", config=config, flags=flags, extra={"alias": None} if no_alias else None)
    _need_dir(Path(cfg.model_path), "model directory")
    from reir.ingestion.pipeline import run_ingestion  # torch: after the checks

    summary = _plain(run_ingestion(cfg))
    typer.echo(json.dumps({k: v for k, v in summary.items() if k != "progress"}, indent=2))  # the samples: job summary
    _write_job_summary(summary)
    if cfg.alias and not summary["promoted"]:
        typer.echo(f"error: {summary['collection']} was not promoted to {cfg.alias}: {summary['check']}", err=True)
        raise typer.Exit(1)


def _sources(specs: list[str]) -> list[Any] | None:
    """``--source`` values; a malformed one is a usage error (exit 2), like a bad flag."""
    from pydantic import ValidationError

    from reir.training.config import SourceSpec

    try:
        return [SourceSpec.parse(s) for s in specs] or None
    except ValidationError:
        raise  # main() names the setting
    except ValueError as e:
        raise UsageError(str(e)) from e


def _metadata_field(spec: str) -> tuple[str, str]:
    name, _, kind = spec.partition(":")
    if not name or kind not in ("str", "int", "float", "bool"):
        raise UsageError(f"--metadata-field wants NAME:TYPE with TYPE str|int|float|bool, got {spec!r}")
    return name, kind


index_app = typer.Typer(no_args_is_help=True, help="Index a folder of photos (add PATH); index versions and the "
                        "serving alias: list, promote, rollback, drop.")
app.add_typer(index_app, name="index")


_INDEX_URI_HELP = "milvus-lite file, or http://host:port [reir.db; $REIR_MILVUS__URI]"
_INDEX_ALIAS_HELP = "serving alias [reir_live]"
_INDEX_CONFIG_HELP = "YAML with an `index:` section or shared `milvus:` keys [$REIR_CONFIG]"


def _catalog_session(milvus_uri: str | None, alias: str | None = None, config: Path | None = None) -> Any:
    """(catalog, store, IndexConfig) from the one config system (so `kubectl exec ... reir index list`
    finds the deployed Milvus through the pod's REIR_MILVUS__URI); a .db file is opened in this process."""
    from reir.platform.catalog import IndexCatalog
    from reir.platform.store import MilvusStore
    from reir.settings import command_config

    cfg = command_config("index", config=config, flags={"milvus_uri": milvus_uri, "alias": alias})
    uri = cfg.milvus.uri
    if cfg.milvus.is_lite_file and not Path(uri).exists():
        raise ReirError(f"milvus-lite file not found: {uri}")
    store = MilvusStore(uri, "reir_catalog", token=cfg.milvus.token)
    return IndexCatalog(store), store, cfg


def index_add_settings(path: Path, *, model_dir: Path | None = None, milvus_uri: str | None = None,
                       full: bool = False, dead_letter: Path | None = None, top_k_instances: int | None = None,
                       min_instance_score: float | None = None, config: Path | None = None) -> Any:  # fmt: skip
    """`reir index add`'s :class:`IngestConfig`: the folder as it is (split None, even when it
    holds an images/test subfolder), the flags given over the config file's and the environment's."""
    from reir.settings import command_config

    flags = {"gallery": path.resolve(), "model_dir": str(model_dir) if model_dir else None, "milvus_uri": milvus_uri,
             "full": False if full else None, "dead_letter": dead_letter, "top_k_instances": top_k_instances,
             "min_instance_score": min_instance_score}  # fmt: skip
    return command_config("ingest", config=config, flags=flags, extra={"split": None})


@index_app.command("add")
def index_add(
    path: Path = typer.Argument(..., help="folder of images (searched recursively; any file names)"),
    model_dir: Path | None = typer.Option(None, "--model", help="trained model directory (required, or model_path)"),
    milvus_uri: str | None = typer.Option(None, help=_INDEX_URI_HELP),
    full: bool = typer.Option(False, help="re-encode every image (not only new / changed ones)"),
    dead_letter: Path | None = typer.Option(None, help="also write failed images (jsonl) here"),
    top_k_instances: int | None = typer.Option(None, min=1, max=1000, help=_TOP_K_HELP),
    min_instance_score: float | None = typer.Option(None, min=0.0, max=0.999, help=_MIN_SCORE_HELP),
    config: Path | None = typer.Option(None, help="YAML: IngestConfig fields or an `ingest:` section "
                                       "[$REIR_CONFIG]; flags given win"),
) -> None:
    """Index a folder of your own photos into the default index; then `reir serve` serves it.

    Nested folders, spaces, unicode and any image format Pillow reads are fine; a file that can not be decoded is counted as failed and named. A rerun indexes only new and changed photos.
    """
    _need_dir(path, "folder")
    cfg = index_add_settings(path, model_dir=model_dir, milvus_uri=milvus_uri, full=full, dead_letter=dead_letter,
                             top_k_instances=top_k_instances, min_instance_score=min_instance_score, config=config)
    _need_dir(Path(cfg.model_path), "model directory")
    from reir.ingestion.folder import describe_scan, scan_folder, summary_lines  # torch: after the checks
    from reir.ingestion.gallery import IMAGE_SUFFIXES
    from reir.ingestion.pipeline import run_ingestion

    scan = scan_folder(path)
    if scan.images == 0:
        raise ReirError(f"no images under {path} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    typer.echo(describe_scan(path, scan), err=True)
    typer.echo(f"indexing into {cfg.milvus.uri} with {cfg.model_path} (progress below)...", err=True)
    summary = run_ingestion(cfg)
    for line in summary_lines(summary, scan):
        typer.echo(line)
    _write_job_summary(_plain(summary))
    if cfg.alias and not summary.promoted:
        raise ReirError(f"{summary.collection} was not promoted to {cfg.alias}: {summary.check}")
    typer.echo(f"next: reir serve --model {cfg.model_path}" + (f" --milvus-uri {milvus_uri}" if milvus_uri else ""))


@index_app.command("list")
def index_list(
    milvus_uri: str | None = typer.Option(None, help=_INDEX_URI_HELP),
    alias: str | None = typer.Option(None, help="only versions of this alias"),
    config: Path | None = typer.Option(None, help=_INDEX_CONFIG_HELP),
) -> None:
    """Collection versions (newest first) with state, rows, and which one each alias serves."""
    from reir.platform.catalog import describe

    catalog, store, _ = _catalog_session(milvus_uri, config=config)
    with store:
        versions = catalog.versions(alias)
        lives = {a: catalog.live(a) for a in {v.alias for v in versions}}
        typer.echo(json.dumps([describe(v, lives.get(v.alias)) for v in versions], indent=2))


@index_app.command("promote")
def index_promote(
    name: str = typer.Argument(..., help="collection version to serve"),
    milvus_uri: str | None = typer.Option(None, help=_INDEX_URI_HELP),
    alias: str | None = typer.Option(None, help=_INDEX_ALIAS_HELP),
    config: Path | None = typer.Option(None, help=_INDEX_CONFIG_HELP),
) -> None:
    """Point the serving alias at a checked version (atomic for readers)."""
    catalog, store, cfg = _catalog_session(milvus_uri, alias, config)
    with store:
        version = catalog.promote(cfg.alias, name)
    typer.echo(f"{cfg.alias} -> {version.name}")


@index_app.command("rollback")
def index_rollback(
    milvus_uri: str | None = typer.Option(None, help=_INDEX_URI_HELP),
    alias: str | None = typer.Option(None, help=_INDEX_ALIAS_HELP),
    config: Path | None = typer.Option(None, help=_INDEX_CONFIG_HELP),
) -> None:
    """Point the alias back at the version it served before the current one."""
    catalog, store, cfg = _catalog_session(milvus_uri, alias, config)
    with store:
        version = catalog.rollback(cfg.alias)
    typer.echo(f"{cfg.alias} -> {version.name}")


@index_app.command("drop")
def index_drop(
    name: str = typer.Argument(...),
    milvus_uri: str | None = typer.Option(None, help=_INDEX_URI_HELP),
    config: Path | None = typer.Option(None, help=_INDEX_CONFIG_HELP),
) -> None:
    """Drop a version that no alias serves (its collection, ledger and record)."""
    from reir.ingestion.ledger import drop_collection_entries

    catalog, store, _ = _catalog_session(milvus_uri, config=config)
    with store:
        catalog.drop(name)
        drop_collection_entries(store, name)
    typer.echo(f"dropped {name}")


model_app = typer.Typer(no_args_is_help=True, help="Trained models: publish one where ingestion and serving read it.")
app.add_typer(model_app, name="model")


@model_app.command("publish")
def model_publish(
    run_dir: Path = typer.Argument(..., help="training run directory (RUN/model) or a model directory"),
    to: Path = typer.Option(..., "--to", help="models folder; the jobs and the RayService read TO/current"),
    version: str | None = typer.Option(None, help="version name [run name + UTC time]; an existing one: "
                                       "point current back at it"),
) -> None:
    """Copy a trained model to TO/VERSION and point TO/current at it (one atomic rename)."""
    from reir.ops.publish import publish_model

    done = publish_model(run_dir, to, version=version)
    typer.echo(json.dumps({"version": done.version, "path": str(done.path), "previous": done.previous}))


@app.command()
def serve(
    model_dir: Path | None = typer.Option(None, "--model", help="trained model directory (required, or model_path)"),
    milvus_uri: str | None = typer.Option(None, help="milvus-lite file or http://host:port of a Milvus [reir.db]"),
    collection: str | None = typer.Option(None, help="collection or alias (reir_live falls back to reir_instances) "
                                          "[reir_live]"),
    port: int | None = typer.Option(None, min=1, max=65535, help="[8000]"),
    host: str | None = typer.Option(None, help="[127.0.0.1]"),
    config: Path | None = typer.Option(None, "--config", help="ServeConfig YAML or a `serve:` section (keys, "
                                       "autoscaling, limits) [$REIR_CONFIG]"),
) -> None:
    """Run the Ray Serve app (blocks until Ctrl-C); the search page is at http://HOST:PORT/."""
    from ray import serve

    from reir.serving.app import app_for
    from reir.serving.lifecycle import (
        check_port_free,
        deploy_failure,
        local_base_url,
        shutdown_serving,
        wait_for_stop_signal,
        wait_until_routed,
    )
    from reir.settings import command_config

    flags = {"model_dir": str(model_dir) if model_dir else None, "milvus_uri": milvus_uri,
             "collection": collection, "port": port, "host": host}
    cfg = command_config("serve", config=config, flags=flags)
    _need_dir(Path(cfg.model_path), "model directory")
    host, port = cfg.host, cfg.port
    application = app_for(cfg)
    check_port_free(host, port)
    init_ray()
    try:
        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(application)
        except RuntimeError as e:  # a replica's constructor failed: say why in one line
            raise deploy_failure(e) from e
        wait_until_routed(local_base_url(host, port))
        typer.echo(f"serving on http://{host}:{port}/ (API: /v1/search, spec: /openapi.json; Ctrl-C stops)")
        stop = wait_for_stop_signal()
        typer.echo(f"{stop.name if stop else 'stop'}: shutting down", err=True)
    finally:
        shutdown_serving()


@app.command()
def search(
    query: str = typer.Argument(..., help="referring expression"),
    url: str | None = typer.Option(None, help="serving URL [http://127.0.0.1:8000]"),
    top_k: int | None = typer.Option(None, min=1, max=MAX_TOP_K, help="[5]"),
    api_key: str | None = typer.Option(None, help="[$REIR_API_KEY]"),
    config: Path | None = typer.Option(None, help="YAML with a `search:` section [$REIR_CONFIG]"),
    discover: bool = typer.Option(False, "--discover", help="every image that holds the object (or none)"),
    rerank: bool | None = typer.Option(None, "--rerank/--no-rerank", help="default: the service's setting"),
    filters: str | None = typer.Option(
        None, "--filters", help='JSON list, e.g. \'[{"field": "image_id", "op": "in", "value": ["a", "b"]}]\''
    ),
    offset: int = typer.Option(0, min=0, max=MAX_OFFSET, help="answers to skip: the page starts here"),
) -> None:
    """Query a running reir service and print the ranked answers."""
    from reir.client import Client
    from reir.settings import command_config

    clauses: list[Any] = []
    if filters:
        try:
            clauses = json.loads(filters)
        except json.JSONDecodeError as e:
            raise UsageError(f"--filters is not valid JSON: {e.msg}") from e
        if not isinstance(clauses, list) or not all(isinstance(c, dict) for c in clauses):
            raise UsageError('--filters must be a JSON list of {"field", "op", "value"} objects')
    cfg = command_config("search", config=config, flags={"url": url, "top_k": top_k, "api_key": api_key})
    body = Client(cfg.url, api_key=cfg.api_key).search_full(query, top_k=cfg.top_k, rerank=rerank, filters=clauses,
                                                            mode="discover" if discover else "rank", offset=offset)
    if body.get("next_offset") is not None:
        typer.echo(f"more: --offset {body['next_offset']}", err=True)
    if discover:
        shown = f"{offset + 1}-{offset + len(body['results'])}" if body["results"] else "none"
        typer.echo(f"{body.get('total', len(body['results']))} image(s) at probability >= {body['threshold']:.3f}; "
                   f"showing {shown}")
    for rank, r in enumerate(body["results"], start=offset + 1):
        box = ", ".join(f"{v:.0f}" for v in r["box"])
        typer.echo(f"{rank:>3}  {r['score']:.3f}  {r['image_id']}  [{box}]  {r['uri']}")


@app.command("api-key")
def api_key(
    name: str = typer.Option(..., help="who the key is for (shown in logs and /v1/admin/config)"),
    admin: bool = typer.Option(False, "--admin", help="also allow admin routes"),
) -> None:
    """Make a new API key: prints the key once (give it to the caller) and the entry to store."""
    import yaml

    from reir.platform.auth import hash_key, new_key
    from reir.platform.config import ApiKeySpec

    key = new_key()
    try:
        spec = ApiKeySpec(name=name, sha256=hash_key(key), scopes=("search", "admin") if admin else ("search",))
    except ValueError as e:
        raise UsageError(f"invalid key name: {name!r} (letters, digits, _ . - only)") from e
    typer.echo(f"key (shown once): {key}", err=True)
    typer.echo(yaml.safe_dump([{**spec.model_dump(mode="json"), "scopes": list(spec.scopes)}], sort_keys=False).strip())


@app.command("eval")
def evaluate(
    data: Path | None = typer.Option(None, "--data", help="benchmark directory (or, with --annotations, the folder "
                                     "its file_names are relative to); --data or --annotations is required"),
    annotations: Path | None = typer.Option(None, help="REIRCOCO json to read the queries from [data/reircoco.json]"),
    split: str | None = typer.Option(None, help="the split whose sentences are the queries [test]"),
    model_dir: Path | None = typer.Option(None, "--model", help="trained model directory (required, or model_path)"),
    milvus_uri: str | None = typer.Option(None, help="index written by reir ingest [reir.db]"),
    collection: str | None = typer.Option(None, help="collection or alias (reir_live falls back to reir_instances) "
                                          "[reir_live]"),
    url: str | None = typer.Option(None, help="evaluate over HTTP against a running service"),
    out: Path | None = typer.Option(None, "--out", help="write metrics JSON here"),
    config: Path | None = typer.Option(None, help="YAML with an `eval:` section [$REIR_CONFIG]"),
    discover: bool = typer.Option(False, "--discover", help="discover mode on the data's discovery.json queries: "
                                  "precision, recall, F1 and none-accuracy at the calibrated threshold, and the "
                                  "precision/recall curve"),
    png: Path | None = typer.Option(None, "--png", help="with --discover: draw the precision/recall curve here"),
) -> None:
    """BR@k at IoU tau (k 1/5/10, tau .5/.7/.9) and REC accuracy on a split's queries (any of a
    sentence's matches counts); BR@k per phrasing family / scene regime when the data has them.
    With --discover: discovery mode's precision/recall on the data's discovery queries."""
    if png is not None and not discover:
        raise UsageError("--png draws the discovery curve: it needs --discover")
    cfg = eval_settings(data=data, annotations=annotations, split=split, model_dir=model_dir,
                        milvus_uri=milvus_uri, collection=collection, url=url, out=out, config=config)
    if discover:
        from reir.evaluation.discovery import evaluate_discovery

        if cfg.data_root is None or not (Path(cfg.data_root) / "discovery.json").is_file():
            raise ReirError(f"--discover reads DATA/discovery.json: none in {cfg.data_root} (reir synth writes one)")
        result = evaluate_discovery(Path(cfg.data_root), Path(cfg.model_path), milvus_uri=cfg.milvus.uri,
                                    collection=cfg.milvus.collection, url=cfg.url, split=cfg.split, png=png,
                                    out=cfg.out, echo=typer.echo)  # fmt: skip
        typer.echo(json.dumps({k: v for k, v in result.items() if k != "curve"}, indent=2))
        return
    from reir.evaluation.runner import evaluate_index

    metrics = evaluate_index(cfg.data_root, Path(cfg.model_path), milvus_uri=cfg.milvus.uri,
                             collection=cfg.milvus.collection, url=cfg.url, out=cfg.out, echo=typer.echo,
                             split=cfg.split, annotations=cfg.annotations)
    typer.echo(json.dumps(metrics, indent=2))


def eval_settings(*, data: Path | None, annotations: Path | None, split: str | None, model_dir: Path | None,
                  milvus_uri: str | None = None, collection: str | None = None, url: str | None = None,
                  out: Path | None = None, config: Path | None = None) -> Any:
    """``reir eval``'s EvalConfig from its flags, the files checked (a missing one: exit 1)."""
    from reir.settings import command_config

    if data is not None:
        _need_dir(data, "data directory")
    if annotations is not None and not annotations.is_file():
        raise ReirError(f"annotations file not found: {annotations}")
    flags = {"data": data, "annotations": annotations, "split": split,
             "model_dir": str(model_dir) if model_dir else None, "milvus_uri": milvus_uri,
             "collection": collection, "url": url, "out": out}
    try:
        cfg = command_config("eval", config=config, flags=flags)
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        if "no queries" in str(e):
            raise UsageError("Missing option '--data' (or --annotations PATH)") from e
        raise
    if cfg.data_root is not None:
        _need_dir(cfg.data_root, "data directory")
    if cfg.annotations is not None and not cfg.annotations.is_file():
        raise ReirError(f"annotations file not found: {cfg.annotations}")
    _need_dir(Path(cfg.model_path), "model directory")
    return cfg


@app.command()
def demo(
    out: Path | None = typer.Option(None, "--out", help="[demo_out]"),
    num_images: int | None = typer.Option(None, min=20, help="images generated, train + test [2000]"),
    test_images: int | None = typer.Option(None, min=1, help="of them in the test split [400, at most a fifth]"),
    extra_images: int | None = typer.Option(None, min=0, help="more training images for the re-ranker alone "
                                            "[as many as the train split holds, at most 1000]"),
    stage_extra_images: int | None = typer.Option(None, min=0, help="more training images for stages 1 and 2 alone "
                                                  "[as many as the train split holds, at most 1000]"),
    minutes: float | None = typer.Option(None, min=0.2, help="training time budget (stages 1, 2 and the re-ranker) "
                                         "[17]"),
    model: str | None = typer.Option(None, help="model preset [small]"),
    seed: int | None = typer.Option(None, help="[0]"),
    lookalike_partners: int | None = typer.Option(None, min=0, help="stage 2: look-alike images per image in a "
                                                  "batch [0]"),
    config: Path | None = typer.Option(None, help="YAML with a `demo:` section [$REIR_CONFIG]"),
) -> None:
    """Synth -> train (2 stages) -> ingest -> serve -> query over HTTP -> BR@k table + picture."""
    from reir.demo import DemoConfig, run_demo
    from reir.settings import command_config

    flags = {"out": str(out) if out else None, "num_images": num_images, "test_images": test_images,
             "extra_images": extra_images, "stage_extra_images": stage_extra_images, "minutes": minutes,
             "model": model, "seed": seed, "lookalike_partners": lookalike_partners}
    run_demo(DemoConfig(**command_config("demo", config=config, flags=flags).model_dump()))


def _write_job_summary(summary: Any) -> None:
    """Under ``reir.ops.jobrun``: leave the summary where it pushes it from (``$REIR_JOB_SUMMARY``)."""
    from reir.platform.telemetry import JOB_SUMMARY_ENV

    path = os.environ.get(JOB_SUMMARY_ENV)
    if path:
        Path(path).write_text(json.dumps(summary))


def _plain(obj: Any) -> Any:
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if hasattr(obj, "model_dump"):
        return obj.model_dump()
    return obj


def main() -> None:
    """Run the CLI; every failure ends in one line on stderr and an exit code (docs/errors.md)."""
    sys.exit(_run(lambda: app(standalone_mode=False)))


def _run(call: Any) -> int:
    from pydantic import ValidationError

    try:
        call()
    except typer.Exit as e:
        return int(e.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except typer.TyperException as e:  # usage errors from the command-line parser
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        if type(e).__name__ == "NoArgsIsHelpError":
            typer.echo(message, err=True)
        else:
            typer.echo(f"error: {' '.join(message.split())}", err=True)
        return 2
    except ValidationError as e:  # a setting (file, environment or flag) the config refuses
        err = e.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ())) or e.title
        typer.echo(f"error: invalid {e.title} setting {where}: {err.get('msg', '')}", err=True)
        return 2
    except (ReirError, OSError, ValueError) as e:  # found while running: not the caller's syntax
        typer.echo(f"error: {_first_line(e)}", err=True)
        return int(getattr(e, "exit_code", 1))
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug: one line here, the traceback in a file
        typer.echo(f"error: internal error ({type(e).__name__}: {_first_line(e)}); traceback in {_save_traceback()}",
                   err=True)
        return 1
    return 0


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _save_traceback() -> str:
    import tempfile
    import traceback

    with tempfile.NamedTemporaryFile("w", prefix="reir-error-", suffix=".txt", delete=False) as fh:
        traceback.print_exc(file=fh)
    return fh.name


if __name__ == "__main__":
    main()
