"""Evaluation runs: turn search answers into BR@k, and measure REC accuracy with the model.

REC accuracy is measured on the model itself, not the index: the expression is scored
against the instances of its own (entry's) image, and the best one must overlap a
target box of that image (IoU >= tau). BR@k accepts any target of the query, in any image
(``reir.data.Query.targets``: every instance the sentence's ``matches`` name).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from reir.data.formats import Query, queries_from_reircoco, test_queries
from reir.evaluation.metrics import (
    Prediction,
    box_recall_at_k,
    format_table,
    rec_accuracy,
    write_metrics_json,
)
from reir.evaluation.slices import evaluate_slices, format_slices, has_slices, read_heldout

TAUS = (0.5, 0.7, 0.9)
KS = (1, 5, 10)


def evaluate_predictions(predictions: dict[str, list[Prediction]], queries: Sequence[Query]) -> dict[str, Any]:
    """BR@k@tau over ``queries``; an answer hitting any target of a query counts."""
    return dict(box_recall_at_k(predictions, {q.query_id: q for q in queries}, ks=KS, taus=TAUS))


def load_queries(data_root: Path | None, split: str = "test", annotations: Path | None = None) -> list[Query]:
    """The queries of ``split``: from the REIRCOCO file ``annotations`` (images relative to
    ``data_root``, else to the file's folder), or from the benchmark directory ``data_root``."""
    if annotations is not None:
        return queries_from_reircoco(annotations, split, image_root=data_root or Path(annotations).parent)
    if data_root is None:
        raise ValueError("no queries: give a benchmark directory or an annotations file")
    return test_queries(data_root, split)


@torch.no_grad()
def rec_accuracy_for(model_dir: Path | str, queries: Sequence[Query],
                     *, top_k: int = 10, batch_images: int = 32) -> dict[str, float]:
    """REC Acc@tau: the best-scoring instance of each query's own image vs any target box in that image."""
    from reir.model import create_model

    model, processor = create_model(str(model_dir))
    model.eval()
    by_image: dict[str, list[Query]] = defaultdict(list)
    for q in queries:
        by_image[q.image_id].append(q)
    top_boxes: dict[str, list[float]] = {}
    image_ids = sorted(by_image)
    for start in range(0, len(image_ids), batch_images):
        chunk = image_ids[start:start + batch_images]
        images = [Image.open(by_image[i][0].path).convert("RGB") for i in chunk]
        out = model.encode_images(processor.images(images))
        instances = processor.postprocess(out, sizes=[im.size for im in images], top_k=top_k)
        for image_id, insts in zip(chunk, instances):
            qs = by_image[image_id]
            if not insts:
                continue
            text = model.encode_text(**processor.text([q.text for q in qs])).embeddings
            inst_emb = torch.from_numpy(np.stack([i.embedding for i in insts])).to(text.dtype)
            best = model.score(text, inst_emb).argmax(dim=-1)
            for q, b in zip(qs, best.tolist()):
                top_boxes[q.query_id] = list(insts[b].box_xywh)
    return dict(rec_accuracy(top_boxes, {q.query_id: q for q in queries}, taus=TAUS))


def evaluate_index(data_root: Path | None, model_dir: Path, *, milvus_uri: str, collection: str, url: str | None,
                   out: Path | None, echo: Callable[[str], None] = print, top_k: int = 10, split: str = "test",
                   annotations: Path | None = None) -> dict[str, Any]:
    """Send every query of ``split`` through the retriever (in process, or over HTTP with ``url``).

    When the queries carry phrasing families or scene regimes, the BR@k per slice
    (:mod:`reir.evaluation.slices`) is printed too and returned (and written) under ``"slices"``.
    """
    import time

    queries = load_queries(data_root, split, annotations)
    started = time.monotonic()
    search = _http_search(url) if url else _inprocess_search(model_dir, milvus_uri, collection)
    predictions = {q.query_id: search(q.text, top_k) for q in queries}
    metrics = evaluate_predictions(predictions, queries)
    metrics.update(rec_accuracy_for(model_dir, queries))
    metrics["num_queries"] = len(queries)
    metrics["wall_seconds"] = round(time.monotonic() - started, 2)
    echo(format_table(metrics))
    extra: dict[str, Any] = {}
    if has_slices(queries):
        heldout = read_heldout(Path(annotations).parent if annotations is not None else None, data_root)
        extra["slices"] = evaluate_slices(predictions, queries, heldout=heldout)
        echo(format_slices(extra["slices"]))
    if out is not None:
        write_metrics_json(out, metrics, **extra)
    return {**metrics, **extra}


def _http_search(url: str) -> Callable[[str, int], list[Prediction]]:
    from reir.client import Client

    client = Client(url)
    return lambda text, k: [Prediction(r["image_id"], r["box"]) for r in client.search(text, top_k=k)]


def _inprocess_search(model_dir: Path, milvus_uri: str, collection: str) -> Callable[[str, int], list[Prediction]]:
    """The service's own query path (encode, ANN, re-rank when the checkpoint has a re-ranker)
    in this process: the figures match what the Serve app answers."""
    import asyncio

    from reir.platform.config import MilvusConfig, ServeConfig
    from reir.serving.pipeline import QueryRequest, local_pipeline

    pipeline = local_pipeline(ServeConfig(model_path=str(model_dir),
                                          milvus=MilvusConfig(uri=milvus_uri, collection=collection)))

    def search(text: str, k: int) -> list[Prediction]:
        outcome = asyncio.run(pipeline.run(QueryRequest(query=text, top_k=k)))
        return [Prediction(r.image_id, r.box) for r in outcome.results]

    return search
