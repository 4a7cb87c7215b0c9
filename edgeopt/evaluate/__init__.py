"""Accuracy and fidelity evaluators, chosen by model kind.

Every evaluator has one signature (``Evaluator``): the candidate's first output and the
baseline's on the same samples, optional labels, optional reference value → ``EvalResult``.
CNNs, encoders and other tensor models share ``evaluate_outputs`` (top-1 accuracy or agreement,
cosine similarity, max abs error). An LLM evaluator (perplexity, KL divergence against the F16
model: token logits ``[N, T, V]`` and next-token labels fit the same signature) is one more
function and one more line in ``EVALUATORS``.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from edgeopt.errors import ModelError
from edgeopt.evaluate.embedding import (
    embedding_metrics,
    evaluate_embeddings,
    mean_pool,
    neighbour_overlap,
)
from edgeopt.evaluate.fidelity import (
    OUTPUT_KEY,
    cosine_per_sample,
    evaluate_outputs,
    load_outputs,
    predictions,
)
from edgeopt.records import EvalResult, ModelKind

__all__ = [
    "EVALUATORS",
    "OUTPUT_KEY",
    "Evaluator",
    "cosine_per_sample",
    "embedding_metrics",
    "evaluate_embeddings",
    "evaluate_outputs",
    "evaluator_for",
    "load_outputs",
    "mean_pool",
    "neighbour_overlap",
    "predictions",
]


class Evaluator(Protocol):
    """Outputs of a candidate and of the baseline on the same samples → ``EvalResult``."""

    def __call__(
        self,
        *,
        candidate: str,
        outputs: np.ndarray,
        baseline_outputs: np.ndarray,
        labels: np.ndarray | None,
        baseline_value: float | None = None,
    ) -> EvalResult: ...


#: model kind -> evaluator. Tests loop over it, so a new entry is covered automatically.
EVALUATORS: dict[str, Evaluator] = {
    "cnn": evaluate_outputs,
    "encoder": evaluate_outputs,
    "rnn": evaluate_outputs,
    "other": evaluate_outputs,
}


def evaluator_for(kind: ModelKind | str) -> Evaluator:
    """The evaluator registered for a model kind; ``ModelError`` naming the supported kinds if none."""
    try:
        return EVALUATORS[kind]
    except KeyError:
        raise ModelError(
            f"no evaluator for model kind {kind!r} yet (supported: {', '.join(EVALUATORS)})"
        ) from None
