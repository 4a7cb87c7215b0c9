"""Like-for-like comparisons: every candidate is compared with a baseline that does the same work.

A ratio (speed-up, memory reduction) is only meaningful when both sides ran the same inputs in the
same shape mode with the same thread budget. A text candidate that runs each sentence at its real
length (``sequence: dynamic``) does far less work than a baseline padded to 128 tokens; a recipe
that sets two intra-op threads uses twice the cores of a one-thread baseline. So the baseline
artifact is measured once per distinct **setting** among the candidates:

    setting = (sequence mode, buckets, intra-op threads, inter-op threads)

and each candidate is gated against the baseline **variant** of its setting (the same FP32 model
with that sequence choice and those threads), measured in the same run, interleaved with it. The
variants are named after the baseline: ``baseline-fp32`` (the profile's setting: fixed shapes,
profile threads), ``baseline-fp32-seq-dynamic``, ``baseline-fp32-seq-bucketed``, ``baseline-fp32-t2``...
A candidate and its baseline variant form a **comparison group**: when any member of a group is
(re)measured, every member is, interleaved (``group_digest`` goes into every member's key).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgeopt.bench.shapes import SEQUENCE_KEY
from edgeopt.keys import digest
from edgeopt.records import Artifact, CandidateSpec

__all__ = ["Group", "Setting", "comparison_groups", "setting_of", "with_threads"]

#: runtime keys by which a backend takes a number of parallel streams / inter-op threads
_INTER_KEYS = ("inter_op_threads", "num_streams")


@dataclass(frozen=True, order=True)
class Setting:
    """What a baseline must share with a candidate for a ratio between them to be fair."""

    sequence: str = "fixed"
    buckets: tuple[int, ...] = ()
    intra_threads: int = 1
    inter_threads: int = 1

    def suffix(self, default: Setting) -> str:
        """The variant's name suffix ('' for the profile's own setting)."""
        parts = []
        if self.sequence != "fixed":
            parts.append(f"seq-{self.sequence}")
            if self.buckets and self.sequence == "bucketed":
                parts.append("-".join(map(str, self.buckets)))
        if (self.intra_threads, self.inter_threads) != (default.intra_threads, default.inter_threads):
            parts.append(f"t{self.intra_threads}" + (f"x{self.inter_threads}" if self.inter_threads != 1 else ""))
        return "-".join(parts)

    def describe(self) -> str:
        seq = self.sequence + (f" {list(self.buckets)}" if self.buckets else "")
        inter = f" x {self.inter_threads} inter-op" if self.inter_threads != 1 else ""
        return f"{seq} shapes, {self.intra_threads} thread(s){inter}"


def with_threads(artifact: Artifact, *, threads: int) -> Artifact:
    """The artifact with its thread budget made explicit: the profile's ``threads`` where the recipe left
    intra-op threads open, and for ONNX Runtime's parallel mode the same where inter-op threads are
    open (ONNX Runtime would otherwise use every core)."""
    runtime = dict(artifact.runtime)
    if runtime.get("intra_op_threads") is None:
        runtime["intra_op_threads"] = threads
    if runtime.get("execution_mode") == "parallel" and runtime.get("inter_op_threads") is None:
        runtime["inter_op_threads"] = threads
    return artifact if runtime == artifact.runtime else artifact.model_copy(update={"runtime": runtime})


def setting_of(artifact: Artifact, *, threads: int) -> Setting:
    """The setting an artifact runs in (after ``with_threads``)."""
    runtime = with_threads(artifact, threads=threads).runtime
    choice = runtime.get(SEQUENCE_KEY) or {}
    mode = choice.get("mode", "fixed")
    parallel = runtime.get("execution_mode") == "parallel" or runtime.get("num_streams")
    inter = next((int(runtime[k]) for k in _INTER_KEYS if runtime.get(k)), 1) if parallel else 1
    return Setting(sequence=mode, buckets=tuple(sorted(choice.get("buckets") or ())) if mode == "bucketed" else (),
                   intra_threads=int(runtime["intra_op_threads"]), inter_threads=inter)


def _baseline_runtime(base: dict[str, Any], setting: Setting) -> dict[str, Any]:
    runtime = {k: v for k, v in base.items() if k != SEQUENCE_KEY}
    runtime["intra_op_threads"] = setting.intra_threads
    if setting.inter_threads != 1:
        runtime.update(execution_mode="parallel", inter_op_threads=setting.inter_threads)
    if setting.sequence != "fixed":
        runtime[SEQUENCE_KEY] = {"mode": setting.sequence, "buckets": list(setting.buckets)}
    return runtime


@dataclass(frozen=True)
class Group:
    """A baseline variant and the candidates compared with it."""

    setting: Setting
    baseline: CandidateSpec
    artifact: Artifact
    members: tuple[str, ...] = field(default=())
    digest: str = ""

    @property
    def names(self) -> tuple[str, ...]:
        """The baseline variant first, then its candidates."""
        return (self.baseline.name, *self.members)


def comparison_groups(baseline: CandidateSpec, baseline_artifact: Artifact,
                      candidates: dict[str, tuple[CandidateSpec, Artifact]], *, threads: int) -> list[Group]:
    """One group per distinct setting among ``candidates`` (built ones), the profile's own first.

    The profile's own group (fixed shapes, ``threads``) always exists: its baseline is the reference
    every candidate's outputs are evaluated against.
    """
    default = Setting(intra_threads=threads)
    by_setting: dict[Setting, list[str]] = {default: []}
    for name, (_spec, art) in candidates.items():
        by_setting.setdefault(setting_of(art, threads=threads), []).append(name)
    groups = []
    for setting, members in by_setting.items():
        suffix = setting.suffix(default)
        name = f"{baseline.name}-{suffix}" if suffix else baseline.name
        spec = baseline.model_copy(update={"name": name, "sequence": setting.sequence, "buckets": setting.buckets})
        art = baseline_artifact.model_copy(update={
            "candidate": name, "runtime": _baseline_runtime(with_threads(baseline_artifact, threads=threads).runtime,
                                                            setting)})
        member_ids = sorted([(name, art.sha256, art.runtime)]
                            + [(m, candidates[m][1].sha256, with_threads(candidates[m][1], threads=threads).runtime)
                               for m in members])
        groups.append(Group(setting=setting, baseline=spec, artifact=art, members=tuple(members),
                            digest=digest(member_ids)))
    return groups
