"""Olive user script: edgeopt's prepared data (a validated ``.npz``) as an Olive data set.

Olive imports this file (``user_script`` of the data config ``edgeopt.backends.olive_run`` writes)
inside the Olive worker process; it registers the ``edgeopt_npz`` data set: one sample per item,
``(inputs by name, label)``, which Olive's default data loader batches (batch 1) and its calibration
reader hands to ONNX Runtime's quantizer. So static quantization calibrates on the user's own data,
offline, for any model kind (images, token ids with their attention masks...).
"""

from __future__ import annotations

import sys

import numpy as np

__all__ = ["NpzDataset", "edgeopt_npz"]

#: the array of class labels in an edgeopt data file (``edgeopt.data.LABELS_KEY``)
_LABELS = "labels"


class NpzDataset:
    """The first ``max_samples`` samples of an edgeopt ``.npz`` file, restricted to ``input_names``."""

    def __init__(self, data_path: str, input_names: list[str], max_samples: int) -> None:
        with np.load(data_path, allow_pickle=False) as npz:
            missing = sorted(set(input_names) - set(npz.files))
            if missing:
                raise ValueError(f"{data_path}: no array for model input(s) {', '.join(missing)} "
                                 f"(has: {', '.join(sorted(npz.files))})")
            self._inputs = {name: np.ascontiguousarray(npz[name][:max_samples]) for name in input_names}
            labels = npz[_LABELS][:max_samples] if _LABELS in npz.files else None
        self._count = int(next(iter(self._inputs.values())).shape[0])
        self._labels = labels if labels is not None else np.zeros(self._count, dtype=np.int64)

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        return {name: arr[index] for name, arr in self._inputs.items()}, self._labels[index]


def edgeopt_npz(data_path: str, input_names: list[str], max_samples: int = 128, **_: object) -> NpzDataset:
    return NpzDataset(data_path, list(input_names), int(max_samples))


# registered when Olive imports this file (Olive is loaded then); importing it elsewhere (e.g. walking the
# edgeopt package) neither needs nor loads Olive
if "olive" in sys.modules:
    from olive.data.registry import Registry

    Registry.register_dataset("edgeopt_npz")(edgeopt_npz)
