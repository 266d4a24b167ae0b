"""Evaluation: REIR box recall, REC accuracy, discovery metrics and BR@k per slice."""

from __future__ import annotations

from reir.evaluation.metrics import (
    Prediction,
    box_recall_at_k,
    discovery_scores,
    format_table,
    is_hit,
    rec_accuracy,
    write_metrics_json,
)
from reir.evaluation.slices import evaluate_slices, format_slices

__all__ = [
    "Prediction",
    "box_recall_at_k",
    "discovery_scores",
    "evaluate_slices",
    "format_slices",
    "format_table",
    "is_hit",
    "rec_accuracy",
    "write_metrics_json",
]
