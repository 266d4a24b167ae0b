"""Evaluation: REIR box recall, REC accuracy and discovery metrics."""

from __future__ import annotations

from reir.evaluation.metrics import (
    Prediction,
    box_recall_at_k,
    discovery_scores,
    format_table,
    rec_accuracy,
    write_metrics_json,
)

__all__ = [
    "Prediction",
    "box_recall_at_k",
    "discovery_scores",
    "format_table",
    "rec_accuracy",
    "write_metrics_json",
]
