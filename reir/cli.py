"""The ``reir`` command line: synth, train, ingest, serve, search, eval, demo, index.

Every command fails with one clear line (no traceback) on bad arguments or missing files.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import typer

from reir.errors import ReirError
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
    discovery_queries: int = typer.Option(100, min=0),
) -> None:
    """Generate the synthetic REIR benchmark (images, REIRCOCO + COCO json, discovery queries)."""
    from reir.data.synth import generate
    from reir.progress import progress_bar

    with progress_bar("synth", total=num_images) as advance:
        summary = generate(out, num_images=num_images, test_fraction=test_fraction, image_size=image_size,
                           seed=seed, discovery_queries=discovery_queries, progress=advance)
    typer.echo(json.dumps(_plain(summary), indent=2))


@app.command()
def train(
    data: Path | None = typer.Option(None, "--data", help="benchmark directory (reir synth --out)"),
    stage: str = typer.Option("1", help="1 (detection + REC), 2 (CLIA), rerank (the re-ranker, on a stage-2 model), "
                              "weak (expressions without referent boxes: detection + MIL contrast) or weak-rerank "
                              "(the re-ranker on a weak model, from the same pairs)"),
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
    config: Path | None = typer.Option(None, help="YAML with TrainConfig fields; flags given win"),
    source: list[str] = typer.Option([], "--source", help="KIND:PATH[:WEIGHT] instead of --data, repeat to mix "
                                     "by weight; KIND: synthetic, reircoco, refcoco, sorec or coco"),
) -> None:
    """Train one stage on Ray Train + DeepSpeed; prints the checkpoint directory."""
    from reir.training.config import STAGES, SourceSpec, TrainConfig
    from reir.training.trainer import run_training

    if data is not None:
        _need_dir(data, "data directory")
    if stage not in STAGES:
        raise ReirError(f"--stage must be {', '.join(STAGES[:-1])} or {STAGES[-1]}, got {stage!r}")
    fields: dict[str, Any] = _yaml(config) if config else {}
    flags = {"model": model, "output_dir": out, "run_name": name, "num_workers": workers,
             "cpus_per_worker": cpus_per_worker, "use_gpu": gpu, "epochs": epochs, "max_steps": max_steps,
             "time_budget_s": minutes * 60 if minutes else None, "batch_size": batch_size, "lr": lr,
             "zero_stage": zero}
    flags.update(checkpoint_every=checkpoint_every, resume=resume, max_failures=max_failures, eval_every=eval_every,
                 lookalike_partners=lookalike_partners)
    fields.update({k: v for k, v in flags.items() if v is not None})
    fields.update(stage=stage)
    if data is not None:
        fields["data_root"] = str(data)
    if source:
        fields["sources"] = [SourceSpec.parse(s) for s in source]
    if not fields.get("data_root") and not fields.get("sources"):
        raise ReirError("Missing option '--data' (or --source KIND:PATH[:WEIGHT])")
    fields.setdefault("run_name", f"reir-stage{stage}" if stage in ("1", "2") else f"reir-{stage}")
    cfg = TrainConfig(**fields)
    init_ray()
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


@app.command()
def ingest(
    gallery: Path | None = typer.Option(None, "--gallery", help="benchmark dir or a directory of images"),
    manifest: str | None = typer.Option(None, help="jsonl / csv / parquet with uri [+ image_id, metadata]"),
    annotations: Path | None = typer.Option(None, help="COCO instances or REIRCOCO json"),
    model_dir: Path = typer.Option(..., "--model", help="trained model directory"),
    milvus_uri: str = typer.Option("reir.db", help="milvus-lite file, or http://host:port"),
    collection: str = typer.Option("reir_instances", help="collection (with --alias: versions' base name)"),
    alias: str | None = typer.Option("reir_live", help="serving alias promoted after a checked build"),
    no_alias: bool = typer.Option(False, "--no-alias", help="write straight into --collection (no versions)"),
    rebuild: bool = typer.Option(False, help="a new collection version even if one for this model exists"),
    full: bool = typer.Option(False, help="re-encode every image (not only new / changed ones)"),
    split: str = typer.Option("test", help="split, when --gallery is a benchmark dir or --annotations REIRCOCO"),
    encoders: int = typer.Option(1, min=1, help="encoder actors"),
    batch_size: int = typer.Option(32, min=1),
    index_type: str = typer.Option("AUTOINDEX", help="AUTOINDEX, HNSW, IVF_FLAT or FLAT"),
    metadata_field: list[str] = typer.Option([], "--metadata-field", help="NAME:TYPE (str|int|float|bool), repeat"),
    device: str = typer.Option("auto", help="auto (GPU when Ray has one), cpu or cuda"),
    dead_letter: Path | None = typer.Option(None, help="also write failed images (jsonl) here"),
    object_store_mb: int | None = typer.Option(None, min=1, help="Ray Data object store budget (MiB)"),
) -> None:
    """Encode a gallery on a Ray Data actor pool and write one row per instance to Milvus."""
    from reir.ingestion.pipeline import run_ingestion
    from reir.platform.config import IngestConfig, MilvusConfig

    if gallery is not None:
        _need_dir(gallery, "gallery")
    if annotations is not None and not annotations.is_file():
        raise ReirError(f"annotations file not found: {annotations}")
    _need_dir(model_dir, "model directory")
    fields = dict(_metadata_field(f) for f in metadata_field)
    cfg = IngestConfig(gallery_root=gallery, manifest=manifest, annotations=annotations, split=split,
                       model_path=str(model_dir), alias=None if no_alias else alias, rebuild=rebuild,
                       incremental=not full, device=device,
                       milvus=MilvusConfig(uri=milvus_uri, collection=collection, index_type=index_type,
                                           metadata_fields=fields),
                       num_encoders=encoders, batch_size=batch_size, dead_letter_path=dead_letter,
                       object_store_memory_limit=object_store_mb * 2**20 if object_store_mb else None)
    init_ray()
    summary = run_ingestion(cfg)
    typer.echo(json.dumps(_plain(summary), indent=2))
    _write_job_summary(_plain(summary))
    if cfg.alias and not summary.promoted:
        typer.echo(f"error: {summary.collection} was not promoted to {cfg.alias}: {summary.check}", err=True)
        raise typer.Exit(1)


def _metadata_field(spec: str) -> tuple[str, str]:
    name, _, kind = spec.partition(":")
    if not name or kind not in ("str", "int", "float", "bool"):
        raise ReirError(f"--metadata-field wants NAME:TYPE with TYPE str|int|float|bool, got {spec!r}")
    return name, kind


index_app = typer.Typer(no_args_is_help=True, help="Index versions and the serving alias: list, promote, rollback, drop.")
app.add_typer(index_app, name="index")


def _catalog_session(milvus_uri: str) -> Any:
    """(catalog, store) over a Milvus URI; a .db file is opened in this process."""
    from reir.platform.catalog import IndexCatalog
    from reir.platform.store import MilvusStore

    if milvus_uri.endswith(".db") and not Path(milvus_uri).exists():
        raise ReirError(f"milvus-lite file not found: {milvus_uri}")
    store = MilvusStore(milvus_uri, "reir_catalog")
    return IndexCatalog(store.client), store


@index_app.command("list")
def index_list(
    milvus_uri: str = typer.Option("reir.db", help="milvus-lite file, or http://host:port"),
    alias: str | None = typer.Option(None, help="only versions of this alias"),
) -> None:
    """Collection versions (newest first) with state, rows, and which one each alias serves."""
    from reir.platform.catalog import describe

    catalog, store = _catalog_session(milvus_uri)
    with store:
        versions = catalog.versions(alias)
        lives = {a: catalog.live(a) for a in {v.alias for v in versions}}
        typer.echo(json.dumps([describe(v, lives.get(v.alias)) for v in versions], indent=2))


@index_app.command("promote")
def index_promote(
    name: str = typer.Argument(..., help="collection version to serve"),
    milvus_uri: str = typer.Option("reir.db"),
    alias: str = typer.Option("reir_live"),
) -> None:
    """Point the serving alias at a checked version (atomic for readers)."""
    catalog, store = _catalog_session(milvus_uri)
    with store:
        version = catalog.promote(alias, name)
    typer.echo(f"{alias} -> {version.name}")


@index_app.command("rollback")
def index_rollback(milvus_uri: str = typer.Option("reir.db"), alias: str = typer.Option("reir_live")) -> None:
    """Point the alias back at the version it served before the current one."""
    catalog, store = _catalog_session(milvus_uri)
    with store:
        version = catalog.rollback(alias)
    typer.echo(f"{alias} -> {version.name}")


@index_app.command("drop")
def index_drop(name: str = typer.Argument(...), milvus_uri: str = typer.Option("reir.db")) -> None:
    """Drop a version that no alias serves (its collection, ledger and record)."""
    from reir.ingestion.ledger import drop_collection_entries

    catalog, store = _catalog_session(milvus_uri)
    with store:
        catalog.drop(name)
        drop_collection_entries(store.client, name)
    typer.echo(f"dropped {name}")


@app.command()
def serve(
    model_dir: Path = typer.Option(..., "--model", help="trained model directory"),
    milvus_uri: str = typer.Option(..., help="http://host:port of a Milvus (lite server) instance"),
    collection: str = typer.Option("reir_live", help="collection or alias (reir_live falls back to reir_instances)"),
    port: int = typer.Option(8000),
    host: str = typer.Option("127.0.0.1"),
    config: Path | None = typer.Option(None, "--config", help="ServeConfig YAML (keys, autoscaling, limits)"),
) -> None:
    """Run the Ray Serve app (blocks until Ctrl-C); the search page is at http://HOST:PORT/."""
    import time

    from ray import serve

    from reir.serving.app import build_app

    _need_dir(model_dir, "model directory")
    args: dict[str, Any] = {"model_path": str(model_dir), "milvus_uri": milvus_uri, "collection": collection}
    if config is not None:
        if not config.is_file():
            raise ReirError(f"config file not found: {config}")
        args["config"] = str(config)
    try:
        application = build_app(args)
    except ValueError as e:  # pydantic ValidationError is a ValueError
        raise ReirError(f"invalid serve configuration: {e}") from e
    init_ray()
    serve.start(http_options={"host": host, "port": port})
    serve.run(application)
    typer.echo(f"serving on http://{host}:{port}/ (API: /v1/search, spec: /openapi.json; Ctrl-C stops)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


@app.command()
def search(
    query: str = typer.Argument(..., help="referring expression"),
    url: str = typer.Option("http://127.0.0.1:8000", help="serving URL"),
    top_k: int = typer.Option(5, min=1, max=1000),
    api_key: str | None = typer.Option(None, envvar="REIR_API_KEY"),
    discover: bool = typer.Option(False, "--discover", help="every image that holds the object (or none)"),
    rerank: bool | None = typer.Option(None, "--rerank/--no-rerank", help="default: the service's setting"),
    filters: str | None = typer.Option(
        None, "--filters", help='JSON list, e.g. \'[{"field": "image_id", "op": "in", "value": ["a", "b"]}]\''
    ),
) -> None:
    """Query a running reir service and print the ranked answers."""
    from reir.client import Client

    clauses: list[Any] = []
    if filters:
        try:
            clauses = json.loads(filters)
        except json.JSONDecodeError as e:
            raise ReirError(f"--filters is not valid JSON: {e.msg}") from e
        if not isinstance(clauses, list) or not all(isinstance(c, dict) for c in clauses):
            raise ReirError('--filters must be a JSON list of {"field", "op", "value"} objects')
    body = Client(url, api_key=api_key).search_full(query, top_k=top_k, mode="discover" if discover else "rank",
                                                    rerank=rerank, filters=clauses)
    if discover:
        typer.echo(f"{len(body['results'])} image(s) at probability >= {body['threshold']:.3f}")
    for rank, r in enumerate(body["results"], start=1):
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
        raise ReirError(f"invalid key name: {name!r} (letters, digits, _ . - only)") from e
    typer.echo(f"key (shown once): {key}", err=True)
    typer.echo(yaml.safe_dump([{**spec.model_dump(mode="json"), "scopes": list(spec.scopes)}], sort_keys=False).strip())


@app.command("eval")
def evaluate(
    data: Path = typer.Option(..., "--data", help="benchmark directory"),
    model_dir: Path = typer.Option(..., "--model", help="trained model directory"),
    milvus_uri: str = typer.Option("reir.db", help="index written by reir ingest"),
    collection: str = typer.Option("reir_live", help="collection or alias (reir_live falls back to reir_instances)"),
    url: str | None = typer.Option(None, help="evaluate over HTTP against a running service"),
    out: Path | None = typer.Option(None, "--out", help="write metrics JSON here"),
) -> None:
    """BR@k at IoU tau (k 1/5/10, tau .5/.7/.9) and REC accuracy on the test queries."""
    from reir.evaluation.runner import evaluate_index

    _need_dir(data, "data directory")
    _need_dir(model_dir, "model directory")
    metrics = evaluate_index(data, model_dir, milvus_uri=milvus_uri, collection=collection, url=url,
                             out=out, echo=typer.echo)
    typer.echo(json.dumps(metrics, indent=2))


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_out"), "--out"),
    num_images: int = typer.Option(2000, min=20),
    minutes: float = typer.Option(14.0, min=0.2, help="training time budget (stages 1, 2 and the re-ranker)"),
    model: str = typer.Option("small", help="model preset"),
    seed: int = typer.Option(0),
    lookalike_partners: int = typer.Option(0, min=0, help="stage 2: look-alike images per image in a batch"),
) -> None:
    """Synth -> train (2 stages) -> ingest -> serve -> query over HTTP -> BR@k table + picture."""
    from reir.demo import DemoConfig, run_demo

    run_demo(DemoConfig(out=str(out), num_images=num_images, train_minutes=minutes, model=model, seed=seed,
                        lookalike_partners=lookalike_partners))


def _yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise ReirError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ReirError(f"config file {path} must hold a mapping")
    return data


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
    from pydantic import ValidationError

    try:
        app(standalone_mode=False)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except typer.TyperException as e:  # usage errors from the command-line parser
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        if type(e).__name__ == "NoArgsIsHelpError":
            typer.echo(message, err=True)
        else:
            typer.echo(f"error: {' '.join(message.split())}", err=True)
        sys.exit(2)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ())) or e.title
        typer.echo(f"error: invalid {e.title} setting {where}: {err.get('msg', '')}", err=True)
        sys.exit(2)
    except (ReirError, FileNotFoundError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        typer.echo(f"error: {msg}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
