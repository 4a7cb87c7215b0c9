"""Pareto frontier of the measured candidates, and the recommendation among those that passed.

Objectives: p95 latency (lower is better; a language model: time per generated token), quality = ``evaluation.value`` (higher; a candidate
without an evaluation is worst), steady-state model memory (lower; unmeasured is worst), size on
disk (lower). A candidate is dominated
when another is no worse in every objective and strictly better in one; equal points do not
dominate each other.

The recommendation (``select``) scores each eligible candidate with the profile's weights::

    w_latency * ln(speedup_p95) + w_accuracy * ln(quality ratio)
      + w_memory * ln(baseline memory / candidate's) + w_size * ln(baseline size / candidate's)

(speed-up and memory against the candidate's like-for-like baseline). When the speed-up verdict pools
this host's earlier runs of the same comparison (``runs_pooled > 1``), the speed-ups used here are
this run's, moved by the factor pooling moved the gated one (``pooled_point / measured``): the ranking
follows the same evidence as the verdict, not this run's weather. A candidate is eligible when
every gate settled as a pass (an ``uncertain`` verdict is not a pass), it is not slower than the baseline at p50 (even
if the profile's gates would allow it) and no other such candidate dominates it. The highest
score wins; ties go to the lower p95 latency, then to the name. Candidates whose score lies within
what the leader's and their own speed-up intervals allow (the latency term moved to the interval's
edges) are tied with it, and the tie goes to the name: the measurements cannot tell them apart, so
the recommendation does not change with the machine's noise.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from edgeopt.gates import quality_ratio
from edgeopt.profiles import Objective
from edgeopt.records import CandidateOutcome, GateVerdict, Selection

__all__ = ["dominates", "nearest_misses", "pareto_frontier", "pooled_factor", "score", "select"]

log = logging.getLogger(__name__)

MAX_NEAREST_MISSES = 3


def _objectives(outcome: CandidateOutcome, *, pooled: bool = False) -> tuple[float, float, float, float]:
    """The objectives of an outcome with a benchmark, each to minimize (``pooled``: the p95 latency moved by
    the factor pooling this host's earlier runs moved its speed-up, see ``pooled_factor``)."""
    bench = outcome.benchmark
    quality = outcome.evaluation.value if outcome.evaluation is not None else -math.inf
    gen = outcome.generation
    if bench is None and gen is not None:  # a language model: time per generated token, model RSS
        memory = gen.rss_model_mb if math.isfinite(gen.rss_model_mb) and gen.rss_model_mb > 0 else math.inf
        return (1e3 / gen.gen_tps if gen.gen_tps > 0 else math.inf, -quality, memory, float(gen.size_bytes))
    if bench is None:
        raise ValueError(f"{outcome.name} has no benchmark; it has no place on the frontier")
    memory = bench.rss_steady_mb if math.isfinite(bench.rss_steady_mb) and bench.rss_steady_mb > 0 else math.inf
    latency = bench.latency_ms_p95 / pooled_factor(outcome) if pooled else bench.latency_ms_p95
    return (latency, -quality, memory, float(bench.size_bytes))


def dominates(a: CandidateOutcome, b: CandidateOutcome, *, pooled: bool = False) -> bool:
    """True if ``a`` is no worse than ``b`` in every objective and strictly better in one."""
    oa, ob = _objectives(a, pooled=pooled), _objectives(b, pooled=pooled)
    return all(x <= y for x, y in zip(oa, ob)) and any(x < y for x, y in zip(oa, ob))


def _non_dominated(outcomes: Sequence[CandidateOutcome], *, pooled: bool = False) -> list[CandidateOutcome]:
    return [o for o in outcomes if not any(dominates(p, o, pooled=pooled) for p in outcomes if p is not o)]


def pareto_frontier(outcomes: Sequence[CandidateOutcome]) -> tuple[str, ...]:
    """Names of the successful outcomes (``outcome.ok``) no other successful outcome dominates, in input order."""
    return tuple(o.name for o in _non_dominated([o for o in outcomes if o.ok]))


def _log(x: float | None, what: str, name: str) -> float:
    """``ln(x)``, or 0 (no information) when x is missing, not positive or not finite."""
    if x is None or not (x > 0 and math.isfinite(x)):
        log.debug("%s: %s is %s; its score term counts as 0", name, what, x)
        return 0.0
    return math.log(x)


def _speedup_verdict(outcome: CandidateOutcome) -> GateVerdict | None:
    return next((v for v in outcome.verdicts if v.gate == "speedup"), None)


def pooled_factor(outcome: CandidateOutcome) -> float:
    """How much pooling this host's earlier runs moved the gated speed-up (``pooled_point / measured``);
    1 when the verdict is this run's alone or a figure is missing."""
    v = _speedup_verdict(outcome)
    if v is None or (v.runs_pooled or 1) <= 1 or v.pooled_point is None:
        return 1.0
    if not (v.pooled_point > 0 and v.measured > 0 and math.isfinite(v.pooled_point) and math.isfinite(v.measured)):
        return 1.0
    return v.pooled_point / v.measured


def _pooled(x: float | None, outcome: CandidateOutcome) -> float | None:
    return None if x is None else x * pooled_factor(outcome)


def score(outcome: CandidateOutcome, *, baseline: CandidateOutcome | None, objective: Objective) -> float:
    """Weighted sum of log-ratios against the baseline (see the module doc); 0 for a term that cannot be formed.

    Speed-up and memory reduction are the ones ``gates.outcome_with_gates`` filled in; a memory
    reduction of 1 (model RSS 0, below what can be measured) and a missing baseline count as 0.
    """
    name = outcome.name
    lat = _log(_pooled(outcome.speedup_p95, outcome), "speedup_p95", name)
    acc = _log(quality_ratio(outcome.evaluation), "quality ratio", name) if outcome.evaluation else 0.0
    red = outcome.memory_reduction
    mem = _log(1.0 / (1.0 - red) if red is not None and red < 1.0 else None, "memory ratio", name)
    size_ratio = None
    base_bench, bench = (baseline.benchmark if baseline else None), outcome.benchmark
    if bench is None and outcome.generation is not None:  # a language model
        base_bench, bench = (baseline.generation if baseline else None), outcome.generation
    if base_bench is not None and bench is not None and bench.size_bytes > 0:
        size_ratio = base_bench.size_bytes / bench.size_bytes
    size = _log(size_ratio, "size ratio", name)
    return objective.latency * lat + objective.accuracy * acc + objective.memory * mem + objective.size * size


def _latency_noise(outcome: CandidateOutcome, objective: Objective, *, side: str) -> float:
    """How far the latency term of the score can move within the speed-up verdict's interval (0 without one;
    the interval is centred on the pooled point when it pools earlier runs)."""
    v = _speedup_verdict(outcome)
    centre = v.measured * pooled_factor(outcome) if v is not None else 0.0
    if v is None or v.ci_low is None or v.ci_high is None or not (v.ci_low > 0 and centre > 0):
        return 0.0
    edge = v.ci_low if side == "low" else v.ci_high
    return objective.latency * abs(math.log(centre) - math.log(edge))


def _fmt_pair(measured: float, threshold: float) -> tuple[str, str]:
    """Both numbers with 2 decimals, or more until they read differently."""
    for decimals in range(2, 7):
        m, t = f"{measured:.{decimals}f}", f"{threshold:.{decimals}f}"
        if m != t:
            return m, t
    return f"{measured:.6g}", f"{threshold:.6g}"


def _describe_failure(v: GateVerdict) -> str:
    if "not evaluated" in v.metric:
        return f"{v.gate} not evaluated"
    if "(not representative)" in v.metric:
        return f"{v.gate} not judged: the speed figures are not representative of the target"
    m, t = _fmt_pair(v.measured, v.threshold)
    if v.status == "uncertain":
        return (f"{v.gate} {m} uncertain: its {v.confidence or 0.95:.0%} interval [{v.ci_low:.2f}, {v.ci_high:.2f}] "
                f"straddles {t}")
    op, word = ("<", "short by") if v.comparator == ">=" else (">", "over by")
    return f"{v.gate} {m} {op} {t} ({word} {abs(v.margin):.2f})"


def _shortfall(v: GateVerdict) -> float:
    if not math.isfinite(v.margin):
        return math.inf
    return abs(v.margin) / abs(v.threshold) if v.threshold else abs(v.margin)


def nearest_misses(outcomes: Sequence[CandidateOutcome], *, limit: int = MAX_NEAREST_MISSES) -> tuple[str, ...]:
    """One line per candidate that was measured but failed a gate, nearest first.

    Ordered by the number of failed gates, then the sum of relative shortfalls
    (``|margin| / threshold``), then the name.
    """
    missed = [o for o in outcomes if o.ok and not o.spec.baseline and o.verdicts and not o.passed]
    ranked = []
    for o in missed:
        failed = [v for v in o.verdicts if not v.passed]
        ranked.append(((len(failed), sum(_shortfall(v) for v in failed), o.name), o.name, failed))
    ranked.sort(key=lambda r: r[0])
    return tuple(f"{name}: " + "; ".join(_describe_failure(v) for v in failed)
                 for _, name, failed in ranked[:limit])


def _quality_phrase(outcome: CandidateOutcome) -> str:
    ev = outcome.evaluation
    if ev is None:
        return "not evaluated"
    if ev.metric == "top1_accuracy":
        return f"accuracy {ev.value:.3f} (baseline {ev.baseline:.3f})"
    if ev.metric == "top1_agreement":
        return f"top-1 agreement {ev.value:.3f} with the baseline"
    return f"{ev.metric} {ev.value:.4g} (baseline {ev.baseline:.4g})"


def _selected_message(outcome: CandidateOutcome) -> str:
    parts = []
    speed = next((v for v in outcome.verdicts if v.gate == "speedup"), None)
    if outcome.speedup_p50 is not None:
        parts.append(f"{outcome.speedup_p50:.1f}× the generation tokens/s" if outcome.generation is not None
                     else f"{outcome.speedup_p50:.1f}× faster at p50")
        if speed is not None and (speed.runs_pooled or 1) > 1 and speed.pooled_point is not None:
            # the verdict rests on every run here: that is the figure to read, this run's beside it
            what = " the generation tokens/s" if outcome.generation is not None else \
                f" faster at {speed.metric.split()[1] if speed.metric.startswith('speedup p') else 'p50'}"
            parts[-1] = (f"{speed.pooled_point:.1f}×{what} over {speed.runs_pooled} runs on this host "
                         f"({outcome.speedup_p50:.1f}× in this run)")
    parts.append(_quality_phrase(outcome))
    red = outcome.memory_reduction
    if red is not None and math.isfinite(red):
        parts.append(f"{red * 100:.0f}% less memory" if red >= 0 else f"{-red * 100:.0f}% more memory")
    return f"selected {outcome.name}: " + ", ".join(parts)


def _nothing_message(outcomes: Sequence[CandidateOutcome], excluded: list[str]) -> str:
    if excluded:
        return "no candidate is eligible: " + "; ".join(excluded) + "; nothing is registered"
    broken = sum(1 for o in outcomes if not o.ok and not o.spec.baseline)
    extra = f" ({broken} failed to build or measure)" if broken else ""
    return f"no candidate passed its gates{extra}; nothing is registered"


def select(outcomes: Sequence[CandidateOutcome], *, objective: Objective) -> Selection:
    """Recommend one candidate (see the module doc), or none with the nearest misses and why."""
    ok = [o for o in outcomes if o.ok]
    frontier = pareto_frontier(ok)
    baseline = next((o for o in ok if o.spec.baseline), None)
    if baseline is None:
        log.warning("no measured baseline among %d outcome(s); size terms of the score count as 0", len(outcomes))
    passing = [o for o in ok if o.passed]

    excluded: list[str] = []
    fast: list[CandidateOutcome] = []
    for o in passing:
        s50 = _pooled(o.speedup_p50, o)
        if s50 is not None and s50 >= 1.0:
            fast.append(o)
            continue
        why = (f"{o.name} passed its gates but is slower than the baseline at p50 "
               f"({s50:.2f}×)" if s50 is not None else f"{o.name} has no p50 speed-up")
        log.info("not recommending %s", why)
        excluded.append(why)

    eligible = _non_dominated(fast, pooled=True)
    for o in eligible:
        if o.name not in frontier:
            log.info("%s passed its gates and is dominated only by candidates that did not; it stays eligible",
                     o.name)
    scores = {o.name: score(o, baseline=baseline, objective=objective) for o in eligible}
    ranked = sorted(eligible, key=lambda o: (-round(scores[o.name], 12), _objectives(o, pooled=True)[0], o.name))
    if ranked:  # candidates the measurements cannot tell from the leader: the tie goes to the name
        lead = ranked[0]
        spread = _latency_noise(lead, objective, side="low")
        tied = [lead] + [o for o in ranked[1:] if spread + _latency_noise(o, objective, side="high") > 0
                         and scores[o.name] + _latency_noise(o, objective, side="high") >= scores[lead.name] - spread]
        if len(tied) > 1:
            log.info("%s are tied within their speed-up intervals; the first by name is recommended",
                     ", ".join(o.name for o in tied))
            ranked = sorted(tied, key=lambda o: o.name) + [o for o in ranked if o not in tied]

    if ranked:
        winner = ranked[0]
        message = _selected_message(winner)
        misses: tuple[str, ...] = ()
        log.info("%s (score %.4f among %d eligible)", message, scores[winner.name], len(ranked))
    else:
        winner = None
        message = _nothing_message(outcomes, excluded)
        misses = nearest_misses(outcomes)
        log.info("%s", message)

    return Selection(
        selected=winner.name if winner is not None else None,
        frontier=frontier,
        passing=tuple(o.name for o in passing),
        scores=scores,
        nearest_misses=misses,
        message=message,
    )
