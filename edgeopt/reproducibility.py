"""Run-to-run spread of speed-up ratios on one host: the floor under every speed-up interval.

A speed-up's interval from one run's interleaved rounds (``edgeopt.intervals``) covers the noise
*within* that run. On a shared machine the ratio itself moves *between* runs as well: other tenants
take memory bandwidth and cache for minutes to hours, and a memory-bound FP32 baseline slows down
more than a cache-resident INT8 candidate. Measured on a 2-vCPU AMD EPYC VM (benchmarks/README.md,
"run-to-run spread"), the same candidate's speed-up moved 2.18–2.40× over three runs within an hour
and sat at 1.7–1.8× in a run a few hours later, while each run's own interval was about ±10%. A verdict settled inside one
run then flips in the next: the registered winner changes with the weather.

So a speed-up verdict settles only when it would hold in another run on this host: its interval is
at least ``point · exp(±z · s)``, where ``s`` is the run-to-run standard deviation of log speed-up
on this host (ISO 5725's reproducibility, which includes the within-run part) and ``z`` the normal
quantile of the gate's confidence. ``s`` is estimated from a prior (the profile's
``benchmark.run_to_run_spread``, worth ``PRIOR_DF`` degrees of freedom) pooled with this host's
history: every comparison measured afresh appends its log speed-up to
``<host state>/<hardware digest>.jsonl`` (``edgeopt.settings.host_state_dir``: the user's
state folder, shared by every project folder and clone on this host, or the ``hosts/`` of a data folder
chosen explicitly); comparisons measured in two runs or more contribute their
deviations from their own mean::

    s² = (PRIOR_DF · s0² + Σ_i Σ_j (x_ij − x̄_i)²) / (PRIOR_DF + Σ_i (n_i − 1))

A quiet, dedicated host narrows its floor run after run; a noisy one widens it. More rounds in one
run cannot settle a ratio whose point lies within ``z · s`` of its threshold (``settleable``), so
the flow does not spend its re-measuring budget on those: they stay ``uncertain``.

**Evidence accumulates over runs** (``pooled``). A comparison measured on this host before (the same
key: both sides' artifacts as they run, settings, evaluation data, tools, hardware and metric) is
judged on every distinct measurement of it, not on this run's alone: with this run's log ratio
``x_0`` and the earlier runs' ``x_1 .. x_m`` (one per run, the latest; a measurement served again
from the cache is the same measurement and counts once), the verdict's interval is::

    x̄ ± z · sqrt(Σ_i v_i) / n,    n = m + 1,    v_i = max(s², run i's own variance)

i.e. runs are taken as independent draws of the host's ratio with standard deviation ``s``, and a
run counts with its own (within-run) variance when that is larger (a run measured under heavy load,
with a wide interval of its own, weighs in with that width: the history stores each run's). A candidate near its threshold
then moves from ``uncertain`` to a settled verdict as runs accumulate, instead of flipping between
pass and uncertain with the weather of each run; its band narrows as ``1/sqrt(n)``.

**A settled verdict is a decision** (``sequential``). Pooling alone still lets a candidate whose
ratio sits a little above its threshold go back and forth between ``pass`` and ``uncertain`` as each
run moves the pooled mean by a fraction of the band (measured: a recipe at ~2.2x against a 2x gate,
pooled lower bound 1.97-2.04 over seven runs). So the verdict is the state of a sequential test
replayed over the comparison's runs on this host in the order they were measured: after each run
``k`` the interval pooling runs ``1..k`` either settles (its lower bound clears the threshold:
``pass``; its upper bound misses it: ``fail``) or straddles it. Once settled, the decision stands
until the pooled evidence settles the other way; a later pooled interval that merely straddles the
threshold again does not reopen it (the verdict says ``held_from_run``). The decision is a function
of the recorded evidence only (replayed, never stored), so every clone and run on this host reaches
the same one from the same history; a changed artifact, tool, setting or machine is another
comparison and starts its own test. What the rule gives up: repeated looks at a ratio whose true
value sits *on* the threshold settle it sooner or later (an indifference zone of about the band's
width around the threshold, where either decision is acceptable); what it protects is the decision
against the weather: to go from pass to fail the pooled evidence has to show the ratio below the
threshold, not just fail to show it above.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from edgeopt.intervals import Interval
from edgeopt.keys import digest, hardware_identity
from edgeopt.records import HardwareFingerprint
from edgeopt.settings import host_state_dir

__all__ = ["PRIOR_DF", "Decision", "RatioRecord", "Spread", "earlier_runs", "estimate", "history_path", "own_sd",
           "pooled", "read_history", "record", "sequential", "settleable", "z_value"]

log = logging.getLogger(__name__)

#: degrees of freedom the profile's prior counts for: four comparisons' worth of evidence
PRIOR_DF = 4.0


@dataclass(frozen=True)
class Spread:
    """The run-to-run standard deviation of log speed-up used as the intervals' floor, and its origin."""

    sd_log: float
    prior: float
    df: int = 0
    comparisons: int = 0

    @property
    def relative(self) -> float:
        """The spread as a relative figure (0.10 = ±10% for one standard deviation)."""
        return math.expm1(self.sd_log)

    def describe(self) -> str:
        if self.df == 0:
            return f"±{self.relative:.0%} run to run (the profile's prior; no history on this host yet)"
        return (f"±{self.relative:.0%} run to run (the profile's ±{math.expm1(self.prior):.0%} pooled with "
                f"{self.df} degree(s) of freedom from {self.comparisons} comparison(s) re-measured on this host)")


@dataclass(frozen=True)
class RatioRecord:
    """One comparison's speed-up as measured afresh in one run (``measurement``: a digest of the
    latency samples of both sides, so the same measurement served again is recognised)."""

    key: str
    run: str
    log_ratio: float
    measurement: str = ""
    sd_log: float = 0.0


def history_path(data_dir: Path | str, hw: HardwareFingerprint, *, kind: str = "") -> Path:
    """The history file of this hardware (same CPU, ISA, cores, OS and tool versions) for the data folder
    ``data_dir``: in the host's state folder (``edgeopt.settings.host_state_dir``: shared by every project
    folder on this host unless the data folder was chosen explicitly). ``kind="llm"``: language models'
    generation speed-ups, kept apart (their run-to-run spread is not the latency ratios')."""
    return host_state_dir(data_dir) / f"{digest(hardware_identity(hw))}{'-' + kind if kind else ''}.jsonl"


def read_history(path: Path) -> list[RatioRecord]:
    """Every record of ``path`` (none if it does not exist); unreadable lines are skipped with a warning."""
    if not path.exists():
        return []
    out, bad = [], 0
    for line in path.read_text().splitlines():
        try:
            d = json.loads(line)
            rec = RatioRecord(key=str(d["key"]), run=str(d["run"]), log_ratio=float(d["log_ratio"]),
                              measurement=str(d.get("measurement", "")), sd_log=float(d.get("sd_log", 0.0)))
        except (ValueError, KeyError, TypeError):
            bad += 1
            continue
        if math.isfinite(rec.log_ratio):
            out.append(rec)
    if bad:
        log.warning("%s: %d unreadable line(s) skipped", path, bad)
    return out


def record(path: Path, *, run: str, ratios: dict[str, float], measurements: dict[str, str] | None = None,
           sds: dict[str, float] | None = None) -> int:
    """Append this run's fresh speed-ups (comparison key -> ratio; ``measurements``: comparison key ->
    digest of the samples; ``sds``: comparison key -> the run's own standard deviation of the log ratio);
    non-finite or non-positive ratios are left out. Returns how many were written."""
    measurements, sds = measurements or {}, sds or {}
    lines = [json.dumps({"key": k, "run": run, "log_ratio": math.log(v), "measurement": measurements.get(k, ""),
                         "sd_log": sds.get(k, 0.0) if math.isfinite(sds.get(k, 0.0)) else 0.0,
                         "at": round(time.time(), 3)})
             for k, v in sorted(ratios.items()) if math.isfinite(v) and v > 0]
    if lines:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:  # one write per run: lines of concurrent runs do not interleave
            fh.write("".join(line + "\n" for line in lines))
    return len(lines)


def estimate(history: Iterable[RatioRecord], *, prior: float) -> Spread:
    """The pooled run-to-run spread (module doc). ``prior`` is a relative spread (0.10 = ±10%).

    Only one value per comparison and run counts (the last), so a run recorded twice does not pass
    for two agreeing runs.
    """
    if not (prior >= 0 and math.isfinite(prior)):
        raise ValueError(f"the prior run-to-run spread must be a finite figure >= 0, got {prior}")
    s0 = math.log1p(prior)
    per_key: dict[str, dict[str, float]] = defaultdict(dict)
    for rec in history:
        per_key[rec.key][rec.run] = rec.log_ratio
    ss, df, used = 0.0, 0, 0
    for runs in per_key.values():
        if len(runs) < 2:
            continue
        values = list(runs.values())
        mean = sum(values) / len(values)
        ss += sum((v - mean) ** 2 for v in values)
        df += len(values) - 1
        used += 1
    sd = math.sqrt((PRIOR_DF * s0 * s0 + ss) / (PRIOR_DF + df))
    return Spread(sd_log=sd, prior=s0, df=df, comparisons=used)


def own_sd(iv: Interval) -> float:
    """The standard deviation of the log ratio that ``iv`` (a ratio's interval) stands for: its wider half
    in log terms over z; NaN when it is not a finite positive interval."""
    if not (iv.finite and iv.point > 0 and iv.low > 0):
        return math.nan
    x = math.log(iv.point)
    return max(x - math.log(iv.low), math.log(iv.high) - x) / z_value(iv.confidence)


def earlier_runs(history: Iterable[RatioRecord], key: str, *, run: str,
                 measurement: str = "") -> list[tuple[float, float]]:
    """(log ratio, the run's own sd) of comparison ``key`` measured in runs other than ``run`` (the latest
    per run), leaving out the measurement ``measurement`` itself (a cached result served again)."""
    per_run: dict[str, tuple[float, float]] = {}
    for rec in history:
        if rec.key == key and rec.run != run and not (measurement and rec.measurement == measurement):
            per_run[rec.run] = (rec.log_ratio, rec.sd_log)
    return list(per_run.values())


def pooled(this: Interval, earlier: list[tuple[float, float]], *, sd_log: float) -> tuple[Interval, int]:
    """``this`` run's ratio interval pooled with the ``earlier`` runs' (log ratio, own sd) of the same
    comparison (module doc), and how many runs it pools. ``this`` unchanged when there is nothing
    earlier, no spread, or ``this`` is not a finite ratio."""
    if not earlier or not sd_log > 0 or not math.isfinite(own_sd(this)):
        return this, 1
    runs = [*earlier, (math.log(this.point), own_sd(this))]
    mean, half = _pool(runs, sd_log=sd_log, z=z_value(this.confidence))
    return Interval(math.exp(mean), math.exp(mean - half), math.exp(mean + half), this.confidence,
                    this.rounds), len(runs)


def _pool(runs: list[tuple[float, float]], *, sd_log: float, z: float) -> tuple[float, float]:
    """Centre and half-width (log terms) of the interval pooling ``runs`` (log ratio, own sd): module doc."""
    n = len(runs)
    mean = sum(x for x, _ in runs) / n
    return mean, z * math.sqrt(sum(max(sd_log, sd if math.isfinite(sd) else 0.0) ** 2 for _, sd in runs)) / n


@dataclass(frozen=True)
class Decision:
    """A speed-up comparison's sequential verdict (``sequential``): ``interval`` pools this run with the
    earlier ones (``pooled``) over ``runs`` runs; ``held`` is the decision ('pass' / 'fail') an earlier
    prefix of the runs settled when this pooled interval straddles the threshold (None otherwise), and
    ``settled_at`` the run (1 = the first of ``runs``) whose pooled evidence settled it."""

    interval: Interval
    runs: int
    held: str | None = None
    settled_at: int | None = None


def _settles(low: float, high: float, threshold: float) -> str | None:
    tol = 1e-9 * max(1.0, abs(threshold))  # as edgeopt.gates.verdict: a threshold met exactly passes
    return "pass" if low >= threshold - tol else ("fail" if high < threshold - tol else None)


def sequential(this: Interval, earlier: list[tuple[float, float]], *, sd_log: float,
               threshold: float) -> Decision:
    """``this`` run's ratio interval pooled with the ``earlier`` runs (in the order they were measured)
    and the decision of the sequential test replayed over them against ``threshold`` (a ``>=`` gate;
    module doc). A finite interval that settles decides by itself; one that straddles the threshold
    holds the last decision an earlier prefix settled, if any."""
    judged, n = pooled(this, earlier, sd_log=sd_log)
    if n <= 1 or not judged.finite or not math.isfinite(threshold):
        return Decision(judged, n)
    if _settles(judged.low, judged.high, threshold) is not None:
        return Decision(judged, n)
    z = z_value(this.confidence)
    state, since = None, None
    for k in range(1, n):  # the prefixes of the earlier runs; the last prefix (all n) is ``judged``
        mean, half = _pool(earlier[:k], sd_log=sd_log, z=z)
        settled = _settles(math.exp(mean - half), math.exp(mean + half), threshold)
        if settled is not None and settled != state:
            state, since = settled, k
    return Decision(judged, n, held=state, settled_at=since)


def z_value(confidence: float) -> float:
    """The two-sided normal quantile of ``confidence`` (1.96 for 0.95)."""
    from scipy.stats import norm

    return float(norm.ppf(0.5 + confidence / 2.0))


def settleable(*, point: float, threshold: float, sd_log: float, confidence: float, runs: int = 1) -> bool:
    """Whether more rounds could settle a ratio at ``point``: False when the threshold lies within the
    run-to-run band ``point · exp(±z · sd_log / sqrt(runs))`` (``runs``: how many runs' evidence the
    ratio pools, ``pooled``), which no number of rounds in this run narrows."""
    if not (point > 0 and threshold > 0 and math.isfinite(point)):
        return True
    return abs(math.log(point) - math.log(threshold)) > z_value(confidence) * sd_log / math.sqrt(max(1, runs))
