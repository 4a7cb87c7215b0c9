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

**Shape settings** (several ``--shape`` values for one input, e.g. two resolutions) are settings too:
each candidate is measured once per extra shape as a variant named ``<candidate>-<shape>``
(``shape_variants``), the same artifact with ``runtime["input_shapes"]`` at that shape, against a
baseline variant at that shape (``baseline-fp32-1x3x640x640``). The first shape is the candidate's own
row; ``combine_shape_verdicts`` then makes every variant's gates part of its verdict (it passes only
if it passes at every shape).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgeopt.bench.shapes import SEQUENCE_KEY
from edgeopt.input_shapes import INPUT_SHAPES_KEY, SHAPE_SETTING_KEY
from edgeopt.keys import digest
from edgeopt.records import Artifact, CandidateOutcome, CandidateSpec, GateVerdict

__all__ = ["Group", "Setting", "combine_shape_verdicts", "comparison_groups", "setting_of", "shape_variants",
           "with_threads"]

#: runtime keys by which a backend takes a number of parallel streams / inter-op threads
_INTER_KEYS = ("inter_op_threads", "num_streams")


@dataclass(frozen=True, order=True)
class Setting:
    """What a baseline must share with a candidate for a ratio between them to be fair."""

    sequence: str = "fixed"
    buckets: tuple[int, ...] = ()
    intra_threads: int = 1
    inter_threads: int = 1
    #: an extra shape setting: its label (``1x3x640x640``) and every input's shape ('' / () for the run's own)
    shape: str = ""
    shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def suffix(self, default: Setting) -> str:
        """The variant's name suffix ('' for the profile's own setting)."""
        parts = [self.shape] if self.shape else []
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
        at = f" at {self.shape}" if self.shape else ""
        return f"{seq} shapes{at}, {self.intra_threads} thread(s){inter}"


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
    label = str(runtime.get(SHAPE_SETTING_KEY) or "")
    shapes = tuple((k, tuple(int(d) for d in v)) for k, v in (runtime.get(INPUT_SHAPES_KEY) or {}).items()) if label else ()
    return Setting(sequence=mode, buckets=tuple(sorted(choice.get("buckets") or ())) if mode == "bucketed" else (),
                   intra_threads=int(runtime["intra_op_threads"]), inter_threads=inter, shape=label, shapes=shapes)


def _baseline_runtime(base: dict[str, Any], setting: Setting) -> dict[str, Any]:
    runtime = {k: v for k, v in base.items() if k != SEQUENCE_KEY}
    runtime["intra_op_threads"] = setting.intra_threads
    if setting.inter_threads != 1:
        runtime.update(execution_mode="parallel", inter_op_threads=setting.inter_threads)
    if setting.sequence != "fixed":
        runtime[SEQUENCE_KEY] = {"mode": setting.sequence, "buckets": list(setting.buckets)}
    if setting.shape:
        runtime.update({INPUT_SHAPES_KEY: {k: list(v) for k, v in setting.shapes}, SHAPE_SETTING_KEY: setting.shape})
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


def shape_variants(candidates: dict[str, tuple[CandidateSpec, Artifact]],
                   settings: list[tuple[str, dict[str, tuple[int, ...]]]]) -> dict[str, tuple[CandidateSpec, Artifact]]:
    """Each built candidate once more per extra shape setting (``(label, shapes)``): the same artifact, named
    ``<candidate>-<label>``, measured at those shapes (its own setting, so its own baseline variant)."""
    out = {}
    for label, shapes in settings:
        for name, (spec, art) in candidates.items():
            vname = f"{name}-{label}"
            runtime = art.runtime | {INPUT_SHAPES_KEY: {k: list(v) for k, v in shapes.items()}, SHAPE_SETTING_KEY: label}
            out[vname] = (spec.model_copy(update={"name": vname}),
                          art.model_copy(update={"candidate": vname, "runtime": runtime}))
    return out


def combine_shape_verdicts(outcomes: list[CandidateOutcome], variants: dict[str, str]) -> list[CandidateOutcome]:
    """Each candidate's outcome with a ``every-shape`` verdict: how many of its shape settings (its own and
    its variants', ``variants``: variant name -> candidate name) passed every gate. It passes only when all
    did; uncertain when none failed and some are uncertain; a failed measurement is a failed setting."""
    by_name = {o.name: o for o in outcomes}
    members: dict[str, list[CandidateOutcome]] = {}
    for vname, cname in variants.items():
        if vname in by_name:
            members.setdefault(cname, []).append(by_name[vname])
    out = []
    for o in outcomes:
        if o.name not in members or not o.ok or not o.verdicts:
            out.append(o)
            continue
        settings = [o, *members[o.name]]
        passed = sum(1 for m in settings if m.passed)
        uncertain = all(m.passed or m.uncertain for m in settings) and passed < len(settings)
        status = "pass" if passed == len(settings) else "uncertain" if uncertain else "fail"
        verdict = GateVerdict(gate="every-shape", metric="shape settings passing", comparator=">=",
                              threshold=float(len(settings)), measured=float(passed),
                              margin=float(passed - len(settings)), passed=status == "pass", status=status)
        out.append(o.model_copy(update={"verdicts": (*o.verdicts, verdict)}))
    return out
