"""Sequence shapes for text models: run each input at its real length, or at a bucketed length.

Text data is tokenized and padded to one length (``--seq-len``, the profile's ``seq_len``), which
measures every candidate at a fixed length. Real sentences are much shorter (median ~25 tokens
against 128), so a runtime that takes each request at its own length does far less work. A
candidate with ``sequence: dynamic`` runs each input cut to its longest real sequence in the batch
(from the attention mask); ``sequence: bucketed`` rounds that up to the smallest of ``buckets``
that fits (a few static shapes, for runtimes that compile per shape). Outputs are padded back to
the full length with zeros so that they compare position by position with the baseline's (the
padded positions are masked out of every text metric).

The choice travels with the artifact as ``runtime["sequence"]`` and is taken out before the
backend loads the model (``split_runtime``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from edgeopt.errors import DataError
from edgeopt.input_shapes import INPUT_SHAPES_KEY, SHAPE_SETTING_KEY

__all__ = ["MASK_INPUT", "SEQUENCE_KEY", "pad_outputs", "sequence_length", "split_runtime", "trim"]

#: the runtime key that carries the candidate's sequence-shape choice
SEQUENCE_KEY = "sequence"
#: the input whose ones mark the real tokens
MASK_INPUT = "attention_mask"


def split_runtime(runtime: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(the backend's runtime options, the sequence choice or None for fixed-length inputs).

    The input shapes (``INPUT_SHAPES_KEY``, see ``edgeopt.input_shapes``) are left out too: they shape
    the data, not the session."""
    rest = {k: v for k, v in runtime.items() if k not in (SEQUENCE_KEY, INPUT_SHAPES_KEY, SHAPE_SETTING_KEY)}
    choice = runtime.get(SEQUENCE_KEY)
    if not choice or choice.get("mode", "fixed") == "fixed":
        return rest, None
    return rest, choice


def sequence_length(feed: dict[str, np.ndarray], choice: dict[str, Any]) -> int:
    """The length a feed runs at: its longest real sequence, rounded up to a bucket if asked."""
    mask = feed.get(MASK_INPUT)
    if mask is None or mask.ndim != 2:
        raise DataError(f"sequence {choice.get('mode')!r} needs a 2-D {MASK_INPUT!r} input to find the real "
                        f"lengths (inputs: {', '.join(sorted(feed))}); use it for text models only")
    full = mask.shape[1]
    real = int(mask.sum(axis=1).max()) if mask.size else 0
    real = max(1, real)
    if choice.get("mode") == "bucketed":
        fitting = [b for b in sorted(choice.get("buckets") or ()) if b >= real]
        return min(fitting[0], full) if fitting else full
    return min(real, full)


def trim(feed: dict[str, np.ndarray], choice: dict[str, Any]) -> tuple[dict[str, np.ndarray], int, int]:
    """(the feed cut to its sequence length, the full length, the length used).

    Every 2-D-or-more input whose second axis is the mask's length is cut on that axis (token ids,
    mask, token types); other inputs are left as they are.
    """
    used = sequence_length(feed, choice)
    full = feed[MASK_INPUT].shape[1]
    out = {k: np.ascontiguousarray(v[:, :used]) if v.ndim >= 2 and v.shape[1] == full else v
           for k, v in feed.items()}
    return out, full, used


def pad_outputs(outputs: Sequence[np.ndarray], *, full: int, used: int) -> list[np.ndarray]:
    """Outputs with a sequence axis of ``used`` padded with zeros back to ``full`` on that axis."""
    if used == full:
        return list(outputs)
    padded = []
    for o in outputs:
        arr = np.asarray(o)
        if arr.ndim >= 2 and arr.shape[1] == used:
            widths = [(0, 0)] * arr.ndim
            widths[1] = (0, full - used)
            arr = np.pad(arr, widths)
        padded.append(arr)
    return padded
