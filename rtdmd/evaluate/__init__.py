"""Evaluation: the toy world's exact metrics (:mod:`rtdmd.evaluate.toy`, docs/toy.md §7) and, for real models,
reward tables and image grids (:mod:`rtdmd.evaluate.images`); ``python -m rtdmd.evaluate --run DIR`` runs the
latter on a finished run (docs/training.md §7)."""

from .toy import (
    DISTANCE_KEYS,
    ROW_KEYS,
    GaussianStats,
    ToyEvaluator,
    format_table,
    frechet_distance,
    frechet_distance_to,
    generate_samples,
)

__all__ = ["DISTANCE_KEYS", "ROW_KEYS", "GaussianStats", "ToyEvaluator", "format_table", "frechet_distance",
           "frechet_distance_to", "generate_samples"]
