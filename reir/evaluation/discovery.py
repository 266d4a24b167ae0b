"""Discovery-mode scoring: every image that holds the described object, or none.

A discovery query has a set of ground-truth matches (image, box), possibly empty. The
service answers with one (image, box, probability) per image whose best candidate reaches
the presence threshold. The metric joins retrieval recall and localization precision:

* an answer is **correct** when its image holds a match and its box overlaps that match's
  box by IoU >= ``tau`` (a right image with a wrong box counts against precision);
* **precision** = correct answers / answers, **recall** = ground-truth images found by a
  correct answer / ground-truth images (both summed over queries: micro averages);
* **F1** of the two, and **none accuracy**: the share of queries with no match that were
  answered with nothing;
* **joint**: one number per query that only a query answered completely *and* cleanly gets in
  full, averaged over queries (so a query with hundreds of matches weighs what a query with
  two does): ``precision_q * recall_q`` for a query with matches, and for a query without,
  1 when it is answered with nothing, else 0. It is in the spirit of the ReSeDis benchmark's
  joint score of retrieval recall and localization precision (Huang et al., 2025), not that
  paper's formula.

Answers are collected once with every candidate kept (threshold 0), then scored at each
threshold: that gives the precision/recall curve and the figures at the calibrated one
(:func:`evaluate_discovery`, what ``reir eval --discover`` and ``bench/discovery.py`` run).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reir.data.records import DiscoveryQuery
from reir.model.boxes import iou_xywh

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Found:
    """One answer of a discovery query: an image, its best box and the presence probability."""

    image_id: str
    box: Box
    prob: float


def _truth(query: DiscoveryQuery) -> dict[str, list[Box]]:
    by_image: dict[str, list[Box]] = {}
    for m in query.matches:
        if m.bbox is None:
            raise ValueError(f"discovery query {query.query_id}: match {m.ann_id} has no bbox")
        by_image.setdefault(str(m.image_id), []).append(tuple(float(v) for v in m.bbox))  # type: ignore[arg-type]
    return by_image


@dataclass(frozen=True)
class Judged:
    """One discovery query's answers at threshold 0, each judged: ``(prob, image, right)``, and
    how many images hold a match. Evaluation judges boxes by IoU (:func:`discovery_scores`),
    calibration by the labels of stored instances (``reir.training.rerank``); both score with
    :func:`tally`."""

    answers: Sequence[tuple[float, Any, bool]]
    truth_images: int

    @property
    def best(self) -> float:
        return max((prob for prob, _, _ in self.answers), default=0.0)

    def kept(self, threshold: float, gate: float = 0.0) -> list[tuple[float, Any, bool]]:
        """What discover mode answers: every image at ``prob >= threshold``, and nothing at all
        when the query's best image stays under ``gate`` (the query-level "is it anywhere?")."""
        if not self.answers or self.best < gate:
            return []
        return [a for a in self.answers if a[0] >= threshold]

    def joint(self, kept: Sequence[tuple[float, Any, bool]]) -> float:
        """The query's joint score for the answers ``kept``: precision x recall with a match,
        1 for nothing without one."""
        if not self.truth_images:
            return float(not kept)
        right = sum(1 for _, _, ok in kept if ok)
        hits = len({image for _, image, ok in kept if ok})
        return right / len(kept) * hits / self.truth_images if kept else 0.0


def tally(judged: Sequence[Judged], threshold: float, gate: float = 0.0) -> dict[str, float]:
    """Precision, recall, F1, none-accuracy and joint of discover mode at ``threshold`` and ``gate``
    (micro averages over answers and ground-truth images; joint per query)."""
    answered = correct = truth_images = found_images = empty = empty_ok = 0
    joint = 0.0
    for j in judged:
        kept = j.kept(threshold, gate)
        answered += len(kept)
        correct += sum(1 for _, _, ok in kept if ok)
        found_images += len({image for _, image, ok in kept if ok})
        truth_images += j.truth_images
        if not j.truth_images:
            empty += 1
            empty_ok += not kept
        joint += j.joint(kept)
    precision = correct / answered if answered else 1.0
    recall = found_images / truth_images if truth_images else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"threshold": float(threshold), "gate": float(gate), "precision": precision, "recall": recall, "f1": f1,
            "none_accuracy": empty_ok / empty if empty else 1.0, "joint": joint / len(judged) if judged else 0.0,
            "answers": float(answered)}  # fmt: skip


def judge(found: Sequence[Found], query: DiscoveryQuery, *, tau: float = 0.5) -> Judged:
    """``found`` judged against ``query``'s matches: right when its image holds a match whose box
    overlaps by IoU >= ``tau``."""
    truth = _truth(query)
    return Judged([(a.prob, a.image_id, any(iou_xywh(a.box, b) >= tau for b in truth.get(a.image_id, ())))
                   for a in found], len(truth))  # fmt: skip


def discovery_scores(
    answers: Mapping[str, Sequence[Found]], queries: Sequence[DiscoveryQuery], threshold: float, *, tau: float = 0.5,
    gate: float = 0.0,
) -> dict[str, float]:
    """Precision, recall, F1, none-accuracy and joint of ``answers`` kept at ``prob >= threshold``
    (nothing for a query whose best answer is under ``gate``): :func:`tally` of :func:`judge`."""
    return tally([judge(answers.get(q.query_id, ()), q, tau=tau) for q in queries], threshold, gate)


def best_gate(threshold: float, best: Sequence[float], answered: Sequence[float], silent: Sequence[float], *,
              none_target: float = 0.0) -> float:
    """The query-level gate for queries whose best image has probability ``best[q]`` and which
    score ``answered[q]`` when answered at ``threshold`` (precision x recall; 0 for a query
    without a match) and ``silent[q]`` when answered with nothing (1 without a match, else 0).

    The per-image threshold is chosen for F1, which scores images; whether to answer at all is
    one decision per query, which the joint score weighs per query. A query answers when its best
    image reaches ``max(gate, threshold)``. Among the gates whose none-accuracy (the share of
    queries without a match that answer nothing) reaches ``none_target`` (all of them when the
    target is 0; the most accurate ones when no gate reaches it), the one with the best joint
    score; ties keep the lower gate. The gate lies halfway between the best probability of the
    last query it silences and the next one above; it is ``threshold`` when silencing nothing
    is chosen."""
    both = list(zip(best, answered, silent, strict=True))
    order = sorted((b, a, s) for b, a, s in both if b >= threshold)
    empty = sum(1 for _, _, s in both if s > 0)
    score = sum(s for b, _, s in both if b < threshold) + sum(a for _, a, _ in order)  # nothing silenced
    quiet = sum(1 for b, _, s in both if s > 0 and b < threshold)  # queries without a match answered with nothing
    options = [(score, quiet, 0)]
    for k, (b, a, s) in enumerate(order, start=1):  # silence the k lowest (never half of a tie)
        score += s - a
        quiet += s > 0
        if k == len(order) or order[k][0] > b:
            options.append((score, quiet, k))
    reach = [o for o in options if not empty or o[1] >= none_target * empty - 1e-9]
    if not reach:
        most = max(o[1] for o in options)
        reach = [o for o in options if o[1] == most]
    best_k = max(reach, key=lambda o: (round(o[0], 9), -o[2]))[2]
    if best_k == 0:
        return float(threshold)
    lo = order[best_k - 1][0]
    hi = order[best_k][0] if best_k < len(order) else 1.0
    return float(min((lo + hi) / 2, 1 - 1e-6))


def gate_for(judged: Sequence[Judged], threshold: float, *, none_target: float = 0.0) -> float:
    """:func:`best_gate` for judged queries at ``threshold``."""
    answered = [j.joint(j.kept(threshold)) if j.truth_images else 0.0 for j in judged]
    silent = [0.0 if j.truth_images else 1.0 for j in judged]
    return best_gate(threshold, [j.best for j in judged], answered, silent, none_target=none_target)


def query_kind(query: DiscoveryQuery) -> str | None:
    """What a synthetic discovery query names: its program's keys, joined (``"background+color+shape"``,
    ``"color+relation+shape"``); None for a query without a program (data not from ``reir synth``)."""
    if not query.program:
        return None
    return "+".join(sorted(k for k, v in query.program.items() if v is not None)) or None


def scores_by_kind(
    answers: Mapping[str, Sequence[Found]], queries: Sequence[DiscoveryQuery], threshold: float, *, tau: float = 0.5,
    gate: float = 0.0,
) -> dict[str, dict[str, float]]:
    """:func:`discovery_scores` per :func:`query_kind` (with ``queries`` and ``empty_queries``
    counts), so a weak kind (a background, a relation, "in the image with ...") shows; ``{}``
    when no query has a program."""
    kinds: dict[str, list[DiscoveryQuery]] = {}
    for q in queries:
        kind = query_kind(q)
        if kind is not None:
            kinds.setdefault(kind, []).append(q)
    return {kind: {**discovery_scores(answers, qs, threshold, tau=tau, gate=gate), "queries": float(len(qs)),
                   "empty_queries": float(sum(1 for q in qs if not q.matches))}
            for kind, qs in sorted(kinds.items())}  # fmt: skip


def format_by_kind(by_kind: Mapping[str, Mapping[str, float]]) -> list[str]:
    """:func:`scores_by_kind` as printable lines, one per kind."""
    lines = []
    for kind, row in by_kind.items():
        none = f"{row['none_accuracy']:.2f}" if row["empty_queries"] else "-"
        lines.append(f"{kind:32s} {int(row['queries']):4d} queries ({int(row['empty_queries'])} empty)  "
                     f"P {row['precision']:.2f}  R {row['recall']:.2f}  F1 {row['f1']:.2f}  none {none}")
    return lines


def discovery_curve(
    answers: Mapping[str, Sequence[Found]], queries: Sequence[DiscoveryQuery], *, tau: float = 0.5,
    points: int = 101, gate: float = 0.0,
) -> list[dict[str, float]]:
    """:func:`discovery_scores` at ``points`` thresholds spread over the answers' probabilities
    (the query-level ``gate`` held)."""
    probs = sorted({a.prob for found in answers.values() for a in found})
    if not probs:
        return [discovery_scores(answers, queries, 0.5, tau=tau, gate=gate)]
    qs = np.unique(np.quantile(np.asarray(probs), np.linspace(0.0, 1.0, points)))
    return [discovery_scores(answers, queries, float(t), tau=tau, gate=gate) for t in qs]


def plot_curve(curve: Sequence[Mapping[str, float]], at: Mapping[str, float], path: Path, *, title: str) -> Path:
    """Precision/recall curve with the calibrated operating point marked, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    ax.plot([c["recall"] for c in curve], [c["precision"] for c in curve], lw=1.5, label="threshold sweep")
    ax.scatter([at["recall"]], [at["precision"]], color="red", zorder=3,
               label=f"calibrated threshold {at['threshold']:.3f} (F1 {at['f1']:.2f})")
    ax.set_xlabel("recall (ground-truth images found with IoU >= 0.5)")
    ax.set_ylabel("precision (answers with the right box)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def summarize(curve: Sequence[Mapping[str, float]], at: Mapping[str, float], queries: Sequence[Any]) -> dict[str, Any]:
    best = max(curve, key=lambda c: c["f1"])
    return {"at_calibrated_threshold": dict(at), "best_f1_on_curve": dict(best), "num_queries": len(queries),
            "empty_queries": sum(1 for q in queries if not q.matches), "curve": [dict(c) for c in curve]}


def evaluate_discovery(
    data_root: Path, model_dir: Path, *, milvus_uri: str, collection: str, url: str | None = None,
    split: str = "test", png: Path | None = None, out: Path | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:  # fmt: skip
    """``reir eval --discover``: every discovery query of ``split`` (``DIR/discovery.json``) in
    discover mode, scored at the calibrated threshold and along the precision/recall curve.

    In process (no ``url``) the query path runs with the threshold and the gate at 0, so every
    candidate image comes back and the curve spans every threshold; the calibrated point is the
    checkpoint's ``calibration.json`` threshold and query-level gate, as the service applies
    them (the curve holds the gate). Over HTTP the service answers at its own threshold and gate:
    the point is exact and the curve covers the thresholds above it.
    Returns (and writes to ``out``) :func:`summarize`'s dict plus ``seconds_per_query`` and, in
    process, ``pool_recall``: the recall at threshold 0, i.e. of every image the re-ranked
    candidate pool holds (what no threshold can exceed), and ``without_gate``: the calibrated
    threshold's figures with no query-level gate.
    """
    from reir.data.formats import load_discovery

    queries = [q for q in load_discovery(data_root) if q.split == split]
    if not queries:
        raise ValueError(f"no {split!r} discovery queries in {data_root} (discovery.json)")
    if url:
        answers, threshold, gate, seconds = _discover_over_http(url, queries)
    else:
        answers, threshold, gate, seconds = _discover_in_process(model_dir, milvus_uri, collection, queries)
    curve = discovery_curve(answers, queries, gate=gate)
    if url:  # nothing under the service's threshold came back: the curve starts there
        curve = ([c for c in curve if c["threshold"] >= threshold]
                 or [discovery_scores(answers, queries, threshold, gate=gate)])  # fmt: skip
    at = discovery_scores(answers, queries, threshold, gate=gate)
    result = summarize(curve, at, queries)
    result.update(seconds_per_query=round(seconds / len(queries), 4), over_http=bool(url), split=split)
    if not url:  # threshold 0: every image of the re-ranked pool came back
        result["pool_recall"] = discovery_scores(answers, queries, 0.0)["recall"]
        result["without_gate"] = discovery_scores(answers, queries, threshold)
    by_kind = scores_by_kind(answers, queries, threshold, gate=gate)
    if by_kind:
        result["by_kind"] = by_kind
    pool = f", recall of the whole candidate pool {result['pool_recall']:.3f}" if "pool_recall" in result else ""
    echo(f"discovery, {len(queries)} queries ({result['empty_queries']} with no match), "
         f"{result['seconds_per_query'] * 1000:.0f} ms per query{pool}")
    rows = [("calibrated threshold", at), ("best F1 on the curve", result["best_f1_on_curve"])]
    if "without_gate" in result:
        rows.append(("calibrated threshold, no gate", result["without_gate"]))
    echo(f"  query-level gate {gate:.3f}: a query whose best image is under it is answered with nothing")
    for name, row in rows:
        echo(f"  {name} {row['threshold']:.3f}: precision {row['precision']:.3f}  recall {row['recall']:.3f}  "
             f"F1 {row['f1']:.3f}  none-accuracy {row['none_accuracy']:.3f}  joint {row['joint']:.3f}  "
             f"answers {int(row['answers'])}")
    if by_kind:
        echo("  at the calibrated threshold, by what the query names:")
        for line in format_by_kind(by_kind):
            echo(f"    {line}")
    if png is not None:
        plot_curve(curve, at, png, title=f"discovery, {len(queries)} queries ({result['empty_queries']} empty)")
        result["png"] = str(png)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _discover_in_process(model_dir: Path, milvus_uri: str, collection: str,
                         queries: Sequence[DiscoveryQuery]) -> tuple[dict[str, list[Found]], float, float, float]:  # fmt: skip
    """Every candidate image of each query (threshold and gate 0), the threshold and gate the
    service applies and the seconds the queries took (the model's load left out)."""
    import asyncio
    import time

    from reir.limits import MAX_OFFSET
    from reir.platform.config import MilvusConfig, ServeConfig
    from reir.serving.pipeline import QueryRequest, local_pipeline
    from reir.serving.rerank import discover_gate_for, discover_threshold_for

    cfg = ServeConfig(model_path=str(model_dir), milvus=MilvusConfig(uri=milvus_uri, collection=collection))
    threshold = discover_threshold_for(model_dir, cfg.discover_threshold)
    gate = discover_gate_for(model_dir)
    pipeline = local_pipeline(cfg, discover_threshold=0.0, discover_gate=0.0)
    try:
        answers = {}
        asyncio.run(pipeline.info())  # the model and store are up before the clock starts
        started = time.perf_counter()
        for q in queries:
            outcome = asyncio.run(pipeline.run(QueryRequest(query=q.raw, mode="discover", top_k=MAX_OFFSET)))
            answers[q.query_id] = [Found(r.image_id, tuple(r.box), r.score) for r in outcome.results]
        seconds = time.perf_counter() - started
    finally:
        pipeline.stages.store.close()  # type: ignore[attr-defined]
    return answers, threshold, gate, seconds


def _discover_over_http(url: str,
                        queries: Sequence[DiscoveryQuery]) -> tuple[dict[str, list[Found]], float, float, float]:  # fmt: skip
    """Every page of each query's answer from the service at ``url``: (answers, the service's
    threshold and gate, seconds)."""
    import time

    from reir.client import Client
    from reir.limits import MAX_TOP_K

    client, answers, threshold, gate, started = Client(url), {}, 0.0, 0.0, time.perf_counter()
    for q in queries:
        answers[q.query_id] = []
        for page in client.discover_pages(q.raw, page_size=MAX_TOP_K):
            threshold = float(page.get("threshold") or 0.0)
            gate = float(page.get("gate") or 0.0)
            answers[q.query_id] += [Found(r["image_id"], tuple(r["box"]), float(r["score"])) for r in page["results"]]
    return answers, threshold, gate, time.perf_counter() - started
