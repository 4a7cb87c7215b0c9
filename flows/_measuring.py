"""The measuring phase of the optimize flow: comparison groups measured in interleaved rounds.

Each candidate is compared with the baseline variant of its setting (``edgeopt.comparison``): same
inputs, sequence shapes and thread budget. Members of a group are measured together: round 1 of
every member of every group, then round 2, ... so slow and fast periods of the machine fall on
all alike; odd rounds run in reverse order. A group is reused from the cache only as a whole: when any member has to be measured
(new, changed, files gone, or cache entry lost), every member of its group is measured again,
interleaved, so a ratio never pairs a fresh candidate with a baseline measured under other load.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from edgeopt import workflow
from edgeopt.comparison import Group
from edgeopt.errors import CandidateFailed
from edgeopt.records import Artifact, BenchmarkResult, CandidateOutcome, CandidateSpec
from tasks.phases import bench_stale, benchmark_task

__all__ = ["Measurements", "measure_rounds"]


@dataclass
class Measurements:
    """Per member: its round results in order, its failure, and whether each round came from the cache."""

    results: dict[str, list[BenchmarkResult]] = field(default_factory=dict)
    failures: dict[str, CandidateOutcome] = field(default_factory=dict)
    cached: dict[str, list[bool]] = field(default_factory=dict)

    def reused(self, name: str) -> bool:
        hits = self.cached.get(name)
        return bool(hits) and all(hits)


def _members(group: Group, only: set[str] | None, m: Measurements) -> list[str]:
    return [n for n in group.names if n not in m.failures and (only is None or n in only)]


def measure_rounds(groups: list[Group], rounds: range, *, specs: dict[str, CandidateSpec],
                   artifacts: dict[str, Artifact], prof, assessment, hw, evaluation, work: str, refresh: bool,
                   m: Measurements, only: set[str] | None = None,
                   progress: Callable[[str, str], None] = lambda *_: None) -> Measurements:
    """Measure ``rounds`` of every member of ``groups`` (or of those in ``only``), interleaved, into ``m``."""
    stale = {g.digest: refresh or any(bench_stale(artifacts[n], prof, evaluation, hw, g.digest, r, work)
                                      for n in _members(g, only, m) for r in rounds) for g in groups}
    kw = {"specs": specs, "artifacts": artifacts, "prof": prof, "assessment": assessment, "hw": hw,
          "evaluation": evaluation, "work": work, "m": m, "only": only, "progress": progress}
    before = {n: len(m.results.get(n, [])) for g in groups for n in g.names}
    hits = _run(groups, rounds, stale, **kw)
    # a group whose cache served some members but not others (a lost cache entry) is measured again, whole
    mixed = [g for g in groups if len({h for n in g.names for h in hits.get(n, [])}) > 1]
    if mixed:
        for g in mixed:
            for n in g.names:
                m.results[n] = m.results.get(n, [])[:before[n]]
                m.cached[n] = m.cached.get(n, [])[:before[n]]
        _run(mixed, rounds, {g.digest: True for g in mixed}, **kw)
    return m


def _run(groups, rounds, stale, *, specs, artifacts, prof, assessment, hw, evaluation, work, m, only,
         progress) -> dict[str, list[bool]]:
    """One pass over ``rounds``; returns, per member, whether each round came from the cache."""
    hits: dict[str, list[bool]] = {}
    total = rounds.stop
    for r in rounds:
        # odd rounds run in reverse order (A B C, C B A, ...): no member is always first or last in a
        # round, so a position effect (a cold cache, a frequency ramp) becomes round-to-round noise the
        # intervals see, not a bias in one member's favour
        order = [(g, name) for g in groups for name in _members(g, only, m)]
        for g, name in (reversed(order) if r % 2 else order):
            if name in m.failures:
                continue
            progress("benchmark", f"{name} ({r + 1}/{total})")
            state = benchmark_task.with_options(refresh_cache=stale[g.digest] or None)(
                artifacts[name], prof, assessment, hw, evaluation, work, g.digest, r, return_state=True)
            try:
                result = state.result()
            except CandidateFailed as exc:
                m.failures[name] = workflow.failed(specs[name], stage="benchmark", error=exc,
                                                   artifact=artifacts[name])
                continue
            m.results.setdefault(name, []).append(result)
            m.cached.setdefault(name, []).append(state.name == "Cached")
            hits.setdefault(name, []).append(state.name == "Cached")
    return hits
