"""Where ONNX Runtime actually runs a model's nodes: the execution provider of each node, read from
one profiled run (silent fallback detection for the ORT backend).

ONNX Runtime assigns each node to the first provider in the session's list that can run it and
quietly gives the rest to the CPU provider. ``placement(...)`` runs the model once with ONNX
Runtime's profiler on, counts the executed nodes per provider and reports the share on the
provider the recipe targets; a model that targets another provider and runs on the CPU is flagged.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PlacementReport", "placement", "probe_feeds"]

log = logging.getLogger(__name__)

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
           "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
           "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


@dataclass(frozen=True)
class PlacementReport:
    """Executed nodes per execution provider in one run."""

    target: str
    nodes: int
    #: provider -> share of executed nodes, most common first
    provider_shares: dict[str, float] = field(default_factory=dict)

    @property
    def target_share(self) -> float:
        return self.provider_shares.get(self.target, 0.0)

    def describe(self) -> list[str]:
        shares = ", ".join(f"{p} {s:.0%}" for p, s in self.provider_shares.items())
        lines = [f"placement: {shares} of {self.nodes} executed nodes; {self.target_share:.0%} on target {self.target}"]
        if self.target != "CPUExecutionProvider" and self.target_share < 1.0:
            lines.append(f"FALLBACK: targets {self.target} but {1 - self.target_share:.0%} of nodes run elsewhere")
        return lines

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"target_share": self.target_share}


def probe_feeds(session: Any, *, seq_len: int = 16) -> dict[str, np.ndarray]:
    """Inputs for one run: dynamic dims are 1 (batch) or ``seq_len``; token ids 1, masks 1, floats N(0, 1)."""
    rng = np.random.default_rng(0)
    feeds = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else (1 if n == 0 else seq_len) for n, d in enumerate(i.shape)]
        dtype = _DTYPES.get(i.type, np.float32)
        if np.issubdtype(dtype, np.floating):
            feeds[i.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[i.name] = np.zeros(shape, dtype=dtype) if "type" in i.name else np.ones(shape, dtype=dtype)
    return feeds


def placement(path: str, *, options: Any, providers: list[str], feeds: dict[str, np.ndarray] | None = None) -> PlacementReport:
    """Run ``path`` once with profiling on (same session options and providers) and count nodes per provider."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="ort-profile-") as tmp:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "run")
        try:
            session = ort.InferenceSession(path, sess_options=options, providers=providers)
            session.run(None, feeds or probe_feeds(session))
            trace = Path(session.end_profiling())
            events = json.loads(trace.read_text(encoding="utf-8"))
        finally:
            options.enable_profiling = False
    node_provider: dict[str, str] = {}
    for e in events:
        args = e.get("args") or {}
        if e.get("cat") == "Node" and "provider" in args:
            node_provider[e["name"].removesuffix("_kernel_time").removesuffix("_fence_before")
                          .removesuffix("_fence_after")] = args["provider"]
    counts = Counter(node_provider.values())
    total = sum(counts.values())
    shares = {p: n / total for p, n in counts.most_common()} if total else {}
    report = PlacementReport(target=providers[0], nodes=total, provider_shares=shares)
    log.debug("%s: %s", path, "; ".join(report.describe()))
    return report
