"""Digits reference models: data pipeline, networks, training, ONNX export and verification.

Imports torch, scikit-learn and onnxruntime at module level: ``edgeopt.zoo`` imports this module
only inside ``build()``, so importing the zoo stays cheap. Everything here is deterministic for a
given seed, torch version and thread count.

Data: scikit-learn's ``load_digits`` (1,797 labelled 8x8 images, values 0..16), scaled to [0, 1],
upscaled to 32x32 (bilinear, ``align_corners=False``) and normalized with the fixed ``MEAN``/``STD``.
Splits are stratified, seeded and disjoint: ``evaluation`` is held out and never trained on;
``calibration`` is also kept out of training (it gives the per-epoch ``val_acc``); the rest trains.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from edgeopt.errors import ConfigError, ModelError

__all__ = [
    "IMAGE_SIZE",
    "INPUT_NAME",
    "MEAN",
    "OUTPUT_NAME",
    "RECIPES",
    "STD",
    "Recipe",
    "Splits",
    "build_into",
    "load_splits",
    "make_network",
    "onnx_accuracy",
    "preprocess",
]

log = logging.getLogger(__name__)

#: Normalization applied after scaling pixels to [0, 1] (mean/std of the 8x8 digits, rounded).
MEAN = 0.3053
STD = 0.3760
IMAGE_SIZE = 32
NUM_CLASSES = 10
EVAL_COUNT = 350
CALIBRATION_COUNT = 200
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_AXIS = "batch"
OPSET = 17
#: onnxruntime 1.31 refuses IR versions above 13; onnx 1.23 may write 14.
MAX_IR_VERSION = 10
#: ONNX outputs must match torch within this (float32, BN folded into conv).
MAX_ABS_DIFF = 1e-3


@dataclass(frozen=True)
class Recipe:
    """How one zoo model is trained."""

    arch: str  # "resnet18" or "tiny"
    epochs: int
    batch_size: int
    max_lr: float  # OneCycle peak learning rate for Adam
    weight_decay: float
    max_shift_px: int  # random translation (train-time augmentation), pixels of the 32x32 image
    threads: int | None = None  # torch intra-op threads; None = os.cpu_count()
    seed: int = 0


RECIPES: dict[str, Recipe] = {
    "digits-resnet": Recipe(
        "resnet18", epochs=5, batch_size=128, max_lr=3e-3, weight_decay=1e-4, max_shift_px=2
    ),
    # one thread: its convolutions are too small to gain from more, and OpenMP's spin-waiting makes
    # two threads several times slower when the machine is busy (measured: 1 s vs 4 s per epoch)
    "digits-tiny": Recipe(
        "tiny", epochs=10, batch_size=64, max_lr=1e-2, weight_decay=0.0, max_shift_px=0, threads=1
    ),
}


@dataclass(frozen=True)
class Splits:
    """Preprocessed inputs (float32 [N,1,32,32]) and int64 labels of each split."""

    train_x: np.ndarray
    train_y: np.ndarray
    calibration_x: np.ndarray
    calibration_y: np.ndarray
    eval_x: np.ndarray
    eval_y: np.ndarray

    def counts(self) -> dict[str, int]:
        return {
            "train": len(self.train_y),
            "calibration": len(self.calibration_y),
            "evaluation": len(self.eval_y),
        }


def preprocess(images: np.ndarray) -> np.ndarray:
    """8x8 digit images (values 0..16) -> float32 [N, 1, 32, 32], scaled to [0, 1] then normalized."""
    x = torch.from_numpy(np.asarray(images, dtype=np.float32).reshape(-1, 1, 8, 8) / 16.0)
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return ((x - MEAN) / STD).numpy().astype(np.float32, copy=False)


def load_splits(*, seed: int) -> Splits:
    """Stratified, seeded, disjoint train / calibration / evaluation splits of the digits."""
    digits = load_digits()
    flat = digits.images.reshape(len(digits.images), -1)
    # exact duplicate images would let one picture land in two splits; keep the first of each
    _, first = np.unique(flat, axis=0, return_index=True)
    keep = np.sort(first)
    images, labels = digits.images[keep], digits.target[keep].astype(np.int64)
    idx = np.arange(len(labels))
    pool, eval_idx = train_test_split(idx, test_size=EVAL_COUNT, stratify=labels, random_state=seed)
    train_idx, cal_idx = train_test_split(
        pool, test_size=CALIBRATION_COUNT, stratify=labels[pool], random_state=seed + 1
    )
    x = preprocess(images)
    return Splits(
        train_x=x[train_idx],
        train_y=labels[train_idx],
        calibration_x=x[cal_idx],
        calibration_y=labels[cal_idx],
        eval_x=x[eval_idx],
        eval_y=labels[eval_idx],
    )


# --- networks -------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: two 3x3 convs with BN, projection shortcut when needed."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class ResNet18(nn.Module):
    """ResNet-18 (torchvision topology) with ``in_channels`` inputs and ``num_classes`` logits."""

    def __init__(self, *, in_channels: int = 1, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        layers: list[nn.Module] = []
        in_ch = 64
        for i, width in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(in_ch, width, stride), BasicBlock(width, width, 1)))
            in_ch = width
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():  # zero-init the last BN of each block, as torchvision offers
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class TinyCNN(nn.Module):
    """Two 3x3 conv layers (8, 16 channels) with max pooling, then one linear layer."""

    def __init__(self, *, in_channels: int = 1, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 8 * 8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(torch.flatten(x, 1))


def make_network(arch: str) -> nn.Module:
    if arch == "resnet18":
        return ResNet18()
    if arch == "tiny":
        return TinyCNN()
    raise ConfigError(f"unknown zoo architecture {arch!r}; allowed: resnet18, tiny")


# --- training -------------------------------------------------------------------------------


def _shift(x: torch.Tensor, max_px: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_px`` pixels, filling with the background value."""
    if max_px <= 0:
        return x
    n = x.shape[0]
    pad = F.pad(x, (max_px,) * 4, value=(0.0 - MEAN) / STD)
    offsets = torch.randint(0, 2 * max_px + 1, (n, 2), generator=gen)
    out = torch.empty_like(x)
    for i in range(n):
        dy, dx = int(offsets[i, 0]), int(offsets[i, 1])
        out[i] = pad[i, :, dy : dy + IMAGE_SIZE, dx : dx + IMAGE_SIZE]
    return out


def _accuracy(net: nn.Module, x: np.ndarray, y: np.ndarray, *, batch_size: int = 256) -> float:
    net.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(y), batch_size):
            logits = net(torch.from_numpy(x[start : start + batch_size]))
            correct += int((logits.argmax(1).numpy() == y[start : start + batch_size]).sum())
    return correct / len(y)


def train(
    net: nn.Module, splits: Splits, recipe: Recipe, *, progress: Callable[[str], None] | None = None
) -> float:
    """Train ``net`` in place (Adam + OneCycle, cross-entropy); returns the wall-clock seconds."""
    gen = torch.Generator().manual_seed(recipe.seed)
    x_all = torch.from_numpy(splits.train_x)
    y_all = torch.from_numpy(splits.train_y)
    steps = (len(y_all) + recipe.batch_size - 1) // recipe.batch_size
    opt = torch.optim.Adam(net.parameters(), lr=recipe.max_lr, weight_decay=recipe.weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.max_lr, total_steps=recipe.epochs * steps)
    start = time.perf_counter()
    for epoch in range(1, recipe.epochs + 1):
        net.train()
        order = torch.randperm(len(y_all), generator=gen)
        total, seen = 0.0, 0
        for b in range(steps):
            idx = order[b * recipe.batch_size : (b + 1) * recipe.batch_size]
            if len(idx) < 2:  # BatchNorm needs more than one sample per batch
                continue
            xb = _shift(x_all[idx], recipe.max_shift_px, gen)
            loss = F.cross_entropy(net(xb), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        val_acc = _accuracy(net, splits.calibration_x, splits.calibration_y)
        msg = f"epoch {epoch}/{recipe.epochs} loss {total / max(seen, 1):.3f} val_acc {val_acc:.3f}"
        log.info("%s", msg)
        if progress is not None:
            progress(msg)
    net.eval()
    return time.perf_counter() - start


# --- export and verification ----------------------------------------------------------------


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def export_onnx(net: nn.Module, path: Path, *, sample: np.ndarray) -> None:
    """Export ``net`` (eval mode) to one self-contained ONNX file with a dynamic batch axis."""
    net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        torch.onnx.export(
            net,
            (torch.from_numpy(sample[:1]),),
            str(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: BATCH_AXIS}, OUTPUT_NAME: {0: BATCH_AXIS}},
            opset_version=OPSET,
            do_constant_folding=True,
        )
    model = onnx.load(str(path))
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def verify_onnx(net: nn.Module, path: Path, *, sample: np.ndarray) -> float:
    """Check the ONNX file runs at batch 1 and 7 and matches torch; returns the max abs diff."""
    sess = _session(path)
    worst = 0.0
    for batch in (1, 7):
        x = sample[:batch]
        got = sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        with torch.no_grad():
            want = net(torch.from_numpy(x)).numpy()
        if got.shape != (batch, NUM_CLASSES) or got.dtype != np.float32:
            raise ModelError(
                f"{path}: ONNX output is {got.dtype}{list(got.shape)}, expected float32[{batch},10]"
            )
        worst = max(worst, float(np.max(np.abs(got - want))))
    if worst > MAX_ABS_DIFF:
        raise ModelError(f"{path}: ONNX logits differ from torch by {worst:.2e} (limit {MAX_ABS_DIFF:.0e})")
    return worst


def onnx_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of the ONNX model at ``path`` on inputs ``x`` and labels ``y`` (onnxruntime)."""
    logits = _session(path).run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    return float(np.mean(logits.argmax(axis=1) == y))


# --- one build ------------------------------------------------------------------------------


def build_into(
    name: str, folder: Path, *, description: str, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Train zoo model ``name`` and write its four files into ``folder``; returns the metadata."""
    recipe = RECIPES.get(name)
    if recipe is None:
        raise ConfigError(f"unknown zoo model {name!r}; allowed: {', '.join(sorted(RECIPES))}")
    threads = recipe.threads or os.cpu_count() or 1
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG as it was
            torch.manual_seed(recipe.seed)
            splits = load_splits(seed=recipe.seed)
            net = make_network(recipe.arch)
            train_seconds = train(net, splits, recipe, progress=progress)
        model_path = folder / "model.onnx"
        export_onnx(net, model_path, sample=splits.eval_x)
        max_diff = verify_onnx(net, model_path, sample=splits.eval_x)
    finally:
        torch.set_num_threads(previous_threads)
    np.savez(folder / "calibration.npz", input=splits.calibration_x)
    np.savez(folder / "eval.npz", input=splits.eval_x, labels=splits.eval_y)
    accuracy = onnx_accuracy(model_path, splits.eval_x, splits.eval_y)
    return {
        "name": name,
        "description": description,
        "accuracy": accuracy,
        "accuracy_metric": "top1 on eval.npz (onnxruntime, CPU)",
        "counts": splits.counts(),
        "seed": recipe.seed,
        "train_seconds": round(train_seconds, 3),
        "train_threads": threads,
        "epochs": recipe.epochs,
        "architecture": recipe.arch,
        "parameter_count": sum(p.numel() for p in net.parameters()),
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "onnxruntime_version": ort.__version__,
        "opset": OPSET,
        "onnx_max_abs_diff_vs_torch": max_diff,
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": [BATCH_AXIS, 1, IMAGE_SIZE, IMAGE_SIZE]},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": [BATCH_AXIS, NUM_CLASSES]},
        "preprocessing": {
            "source": "sklearn.datasets.load_digits (8x8, values 0..16)",
            "scale": "x / 16",
            "resize": "bilinear to 32x32, align_corners=False",
            "mean": MEAN,
            "std": STD,
        },
    }
