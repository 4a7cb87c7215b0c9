"""Presentation of an optimize run: one row per candidate, as plain strings (CLI, Markdown, MLflow)."""

from __future__ import annotations

from collections.abc import Sequence

from edgeopt.records import BenchmarkResult, CandidateOutcome, Selection

__all__ = ["COLUMNS", "markdown", "rows", "verdict"]

COLUMNS = ("candidate", "runs as", "tokens", "p50 ms", "p95 ms", "p50 spread", "speed-up p50", "speed-up p95", "model RSS MB", "peak RSS MB",
           "size MB", "accuracy", "fidelity", "verdict")


def verdict(o: CandidateOutcome, selection: Selection | None = None) -> str:
    if o.failure:
        return f"failed ({o.failure.reason})"
    if o.spec.baseline:
        return "baseline"
    if selection is not None and selection.selected == o.name:
        return "SELECTED"
    failed = [v.gate for v in o.verdicts if not v.passed]
    if not failed:
        return "pass"
    return "fail: " + ", ".join(failed)


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _tokens(b: BenchmarkResult | None) -> str:
    """The token length text inputs ran at: '128' fixed, '~24 dyn' / '~32 bkt' (mean) otherwise."""
    if b is None or b.seq_len_mean is None:
        return "-"
    if b.sequence == "fixed":
        return f"{b.seq_len_mean:.0f}"
    return f"~{b.seq_len_mean:.0f} {'dyn' if b.sequence == 'dynamic' else 'bkt'}"


def rows(outcomes: Sequence[CandidateOutcome], selection: Selection | None = None) -> list[dict[str, str]]:
    out = []
    for o in outcomes:
        b, e = o.benchmark, o.evaluation
        accuracy = fidelity = "-"
        if e is not None:
            short = {"top1_accuracy": "", "top1_agreement": "agree ", "cosine_mean": "cos "}.get(e.metric, f"{e.metric} ")
            accuracy = f"{short}{e.value:.4f}"
            fidelity = f"agree {e.top1_agreement:.3f} cos {e.cosine_mean:.4f}"
        out.append({
            "candidate": o.name,
            "runs as": o.artifact.precision if o.artifact else "-",
            "tokens": _tokens(b),
            "p50 ms": _f(b and b.latency_ms_p50, ".3f"),
            "p95 ms": _f(b and b.latency_ms_p95, ".3f"),
            "p50 spread": f"{b.latency_p50_spread_pct:.1f}% ({b.repeats}x)" if b else "-",
            "speed-up p50": "1.00x" if (o.spec.baseline and b) else _f(o.speedup_p50, ".2f") + ("x" if o.speedup_p50 else ""),
            "speed-up p95": "1.00x" if (o.spec.baseline and b) else _f(o.speedup_p95, ".2f") + ("x" if o.speedup_p95 else ""),
            "model RSS MB": _f(b and b.rss_model_mb, ".1f"),
            "peak RSS MB": _f(b and b.rss_peak_mb, ".1f"),
            "size MB": _f(b.size_bytes / 1e6 if b else (o.artifact.size_bytes / 1e6 if o.artifact else None), ".2f"),
            "accuracy": accuracy,
            "fidelity": fidelity,
            "verdict": verdict(o, selection),
        })
    return out


def markdown(outcomes: Sequence[CandidateOutcome], selection: Selection, *, title: str, links: dict[str, str]) -> str:
    lines = [f"# {title}", "", f"**{selection.message}**", ""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "---|" * len(COLUMNS))
    for r in rows(outcomes, selection):
        lines.append("| " + " | ".join(r[c] for c in COLUMNS) + " |")
    if selection.nearest_misses:
        lines += ["", "**Nearest misses**", ""] + [f"- {m}" for m in selection.nearest_misses]
    failures = [o for o in outcomes if o.failure]
    if failures:
        lines += ["", "**Failures**", ""] + [f"- {o.name}: `{o.failure.reason}` at {o.failure.stage}: {o.failure.message}"
                                             for o in failures]
    verdicts = [o for o in outcomes if o.verdicts]
    if verdicts:
        lines += ["", "**Gate verdicts**", ""]
        for o in verdicts:
            lines.append(f"- {o.name}: " + "; ".join(v.describe() for v in o.verdicts))
    if selection.frontier:
        lines += ["", f"Pareto frontier (p95 latency, quality, model RSS, size): {', '.join(selection.frontier)}"]
    if links:
        lines += [""] + [f"- {k}: {v}" for k, v in links.items()]
    return "\n".join(lines) + "\n"
