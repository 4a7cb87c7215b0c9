"""Records of cross-validation and certification: what was checked, the verdict, the evidence.

``Subject`` (the registered artifact and its FP32 baseline, as local files) → one ``CheckResult`` per
check (``edgeopt.certify.<check>``) → ``Certification``.  Cross-validation: ``MatrixCell`` per
runtime × device → ``CrossValidation``.  Like every record: frozen, unknown fields rejected, units in
the field names, NaN for a figure that could not be measured (never 0).
"""

from __future__ import annotations

import json
import math
from pathlib import PurePath
from typing import Any, Literal

from pydantic import Field, field_validator

from edgeopt.records import Artifact, HardwareFingerprint, ModelKind, Record, TensorSpec

__all__ = ["Certification", "CheckResult", "CheckStatus", "CrossValidateReport", "CrossValidation", "MatrixCell",
           "Subject"]

CheckStatus = Literal["pass", "fail", "not-applicable"]


class Subject(Record):
    """What is certified or cross-validated: one registered model version, as local files."""

    model_name: str = Field(description="registered model name in MLflow")
    version: str = Field(description="registered model version")
    artifact: Artifact = Field(description="the version's artifact; ``path`` is a local file or folder")
    baseline: Artifact = Field(description="the FP32 baseline it was gated against; ``path`` is local")
    signature: tuple[TensorSpec, ...] = Field(description="the model's inputs")
    kind: ModelKind
    profile: str = Field(description="target profile it was optimized for")
    profile_doc: dict[str, Any] = Field(default_factory=dict, description="that profile as it was then (validated "
                                        "as ``edgeopt.profiles.Profile``): threads, benchmark settings, gates")
    gates: dict[str, Any] = Field(default_factory=dict, description="the profile's effective gates for its kind")
    recorded: dict[str, float] = Field(
        default_factory=dict, description="figures recorded when it was selected (speedup_p50, its ci_low / "
        "ci_high, latency_ms_p50, accuracy...), from its MLflow run")
    recorded_hardware: dict[str, str] = Field(
        default_factory=dict, description="the machine that measured the recorded figures: cpu, arch, isa")


class CheckResult(Record):
    """One certification check's verdict with the evidence it used."""

    check: str = Field(description="data-quality, accuracy, robustness, stress, soak, power, provenance, ...")
    status: CheckStatus
    summary: str = Field(description="one line: what was measured and how it compares with its threshold")
    reason: str | None = Field(None, description="why it failed or does not apply (one line)")
    evidence: dict[str, Any] = Field(default_factory=dict, description="JSON-able figures and the settings used")
    files: tuple[str, ...] = Field(default=(), description="evidence files written (charts, series, suite results)")
    duration_s: float = Field(default=math.nan, description="wall time of the check")

    @field_validator("evidence", mode="before")
    @classmethod
    def _plain(cls, v: Any) -> Any:
        """Evidence as plain JSON values (numpy scalars and arrays, paths): it goes to MLflow and the report."""
        def plain(x: Any) -> Any:
            if hasattr(x, "tolist"):
                return x.tolist()
            if isinstance(x, PurePath):
                return str(x)
            if isinstance(x, (set, frozenset)):
                return sorted(x, key=str)
            raise TypeError(f"evidence value of type {type(x).__name__} is not JSON-able")

        return json.loads(json.dumps(v, default=plain)) if isinstance(v, dict) else v

    @property
    def passed(self) -> bool:
        return self.status != "fail"


class Certification(Record):
    """All checks of one certification run. ``certified`` only when no check failed."""

    subject: Subject
    checks: tuple[CheckResult, ...]
    hardware: HardwareFingerprint
    created_utc: str = Field(description="ISO-8601 time the certification finished")
    manifest_sha256: str | None = Field(None, description="sha256 of the signed manifest")

    @property
    def certified(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def failed_checks(self) -> tuple[str, ...]:
        return tuple(c.check for c in self.checks if not c.passed)


class MatrixCell(Record):
    """The artifact on one runtime × device of this host."""

    runtime: str = Field(description="backend name: onnxruntime, openvino, ...")
    device: str = Field(description="device or execution provider, e.g. CPU")
    status: Literal["ok", "failed", "not-reproducible", "unfaithful"]
    message: str = ""
    latency_ms_p50: float = math.nan
    latency_ms_p50_ci: tuple[float, float] = (math.nan, math.nan)
    speedup_p50: float = math.nan
    speedup_ci: tuple[float, float] = (math.nan, math.nan)
    rounds: int = 0
    cosine_vs_baseline: float = math.nan
    top1_vs_baseline: float = math.nan
    max_abs_vs_baseline: float = math.nan
    placement_share: float | None = Field(None, description="share of nodes run on the target device")


class CrossValidation(Record):
    """The measured runtime × device matrix of one artifact on one host."""

    subject: Subject
    hardware: HardwareFingerprint
    cells: tuple[MatrixCell, ...]
    agreement: dict[str, float] = Field(
        default_factory=dict, description="'runtimeA/deviceA~runtimeB/deviceB' -> mean cosine of their outputs")
    reproducible: bool | None = Field(None, description="the recorded speed-up reproduced on its own runtime")
    verdict: Literal["pass", "fail", "not-reproducible"]
    summary: str = ""


class CrossValidateReport(Record):
    """What the cross-validate flow returns: one matrix per host (pool) it ran on.

    A record of the core, not of the flow module: a pool's run returns it through Prefect's result
    storage, and the caller unpickles it by this importable name.
    """

    matrices: tuple[CrossValidation, ...]
    mlflow_run_id: str | None = None

    @property
    def verdict(self) -> str:
        order = ("fail", "not-reproducible", "pass")
        return min((m.verdict for m in self.matrices), key=order.index, default="fail")
