"""The llama.cpp-like surface the language-model evaluators use (``edgeopt.evaluate.llm``), for runtimes that
give logits for a token sequence and use the checkpoint's Hugging Face tokenizer (OpenVINO GenAI, MLX).

A subclass loads its model and sets ``tokenizer``, and implements ``_logits(ids) -> [seq, vocab]`` and
``generate``; this class keeps the context (``eval`` appends to it; ``scores`` holds every position's logits)
and provides the ``Session`` protocol's ``run({"input_ids": [batch, seq]})`` -> logits [batch, seq, vocab].
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np

__all__ = ["HFTokenizerSession"]


class HFTokenizerSession:
    input_names: ClassVar[list[str]] = ["input_ids"]
    tokenizer: Any

    def __init__(self) -> None:
        self._ids: list[int] = []
        self.scores = np.zeros((0, 0), dtype=np.float32)

    def _logits(self, ids: list[int]) -> np.ndarray:
        raise NotImplementedError

    def generate(self, ids: list[int], *, temp: float = 0.0, top_k: int = 1, reset: bool = True,
                 max_tokens: int = 64) -> Iterator[int]:
        raise NotImplementedError

    def _context(self, ids: list[int], *, temp: float, top_k: int, reset: bool) -> list[int]:
        """The tokens a greedy ``generate`` continues (only greedy: ``temp`` 0 / ``top_k`` 1, as the evaluators ask)."""
        if temp != 0.0 or top_k != 1:
            raise ValueError(f"{type(self).__name__} generates greedily only (temp=0, top_k=1)")
        return [int(t) for t in ids] if reset else self._ids + [int(t) for t in ids]

    def reset(self) -> None:
        self._ids = []
        self.scores = np.zeros((0, 0), dtype=np.float32)

    def eval(self, ids: list[int]) -> None:
        """Append ``ids`` to the context; ``scores`` holds the logits of every position so far."""
        self._ids += [int(t) for t in ids]
        self.scores = self._logits(self._ids)

    def tokenize(self, text: bytes, add_bos: bool = False, special: bool = False) -> list[int]:
        """As ``llama_cpp.Llama.tokenize``: with ``special=False`` (the evaluators') the text of a special token
        ("<s>", "</s>", "<|user|>") written in the text is tokenized as text, as llama.cpp does and as the F16
        reference's tokens are; Hugging Face's default would match it as the special token's id."""
        return list(self.tokenizer.encode(text.decode("utf-8"), add_special_tokens=add_bos,
                                          split_special_tokens=not special))

    def detokenize(self, ids: list[int]) -> bytes:
        return self.tokenizer.decode(ids).encode("utf-8")

    def token_eos(self) -> int:
        return int(self.tokenizer.eos_token_id) if self.tokenizer.eos_token_id is not None else -1

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [np.stack([self._logits([int(t) for t in row]) for row in np.asarray(feeds["input_ids"])])]
