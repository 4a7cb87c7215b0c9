"""Presentation of an optimize run: one row per candidate, as plain strings (CLI, Markdown, MLflow)."""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from html import escape

from edgeopt.records import BenchmarkResult, CandidateOutcome, Selection

__all__ = ["CLI_COLUMNS", "COLUMNS", "LLM_CLI_COLUMNS", "LLM_COLUMNS", "llm_rows", "markdown", "pareto_chart_markdown", "pareto_chart_svg", "per_sample_note",
           "rows", "shape_settings_note", "spread_note", "synthetic_note", "verdict"]

COLUMNS = ("candidate", "runs as", "tokens", "vs", "p50 ms", "p95 ms", "p50 spread", "speed-up p50", "speed-up p95",
           "speed-up CI", "steady MB", "peak MB", "memory -%", "size MB", "accuracy", "fidelity", "verdict")
#: the columns the command line shows (the Markdown report and MLflow have them all)
CLI_COLUMNS = ("candidate", "runs as", "tokens", "vs", "p50 ms", "speed-up p50", "speed-up CI", "steady MB",
               "peak MB", "memory -%", "size MB", "accuracy", "verdict")

#: marks a speed figure that does not stand for the target (``GenerationResult.not_representative``)
NOT_REPRESENTATIVE = " (n/r)"

#: language models (llama.cpp): generation against the F16 reference, measured side by side
LLM_COLUMNS = ("candidate", "runs as", "vs", "gen tok/s", "bound", "prompt tok/s", "TTFT ms", "speed-up", "speed-up CI",
               "peak RSS MB", "model MB", "KV MB", "memory -%", "size MB", "perplexity", "KLD vs F16", "KLD p99",
               "top-1 agree", "verdict")
LLM_CLI_COLUMNS = ("candidate", "runs as", "gen tok/s", "prompt tok/s", "TTFT ms", "speed-up", "speed-up CI",
                   "peak RSS MB", "size MB", "perplexity", "KLD vs F16", "top-1 agree", "verdict")


def verdict(o: CandidateOutcome, selection: Selection | None = None) -> str:
    if o.failure:
        return f"failed ({o.failure.reason})"
    if o.spec.baseline:
        return "baseline"
    if selection is not None and selection.selected == o.name:
        return "SELECTED"
    if not o.verdicts:
        return "not gated"
    caveat = o.generation.not_representative if o.generation else None
    failed = [f"{v.gate} (speed not representative)" if v.gate == "speedup" and caveat else v.gate
              for v in o.verdicts if v.status == "fail"]
    uncertain = [v.gate for v in o.verdicts if v.status == "uncertain"]
    if not failed and not uncertain:
        return "pass"
    parts = (["fail: " + ", ".join(failed)] if failed else []) + (["uncertain: " + ", ".join(uncertain)]
                                                                   if uncertain else [])
    return "; ".join(parts)


def _ci(o: CandidateOutcome, gate: str) -> str:
    v = next((v for v in o.verdicts if v.gate == gate), None)
    if v is None or v.ci_low is None or v.ci_high is None:
        return "-"
    runs = f" ({v.runs_pooled} runs)" if (v.runs_pooled or 1) > 1 else ""
    if v.held_from_run is not None:  # the interval straddles: the verdict is the decision runs 1..k settled
        runs = f" ({v.runs_pooled} runs; {v.status} held from run {v.held_from_run})"
    return f"{v.ci_low:.2f}-{v.ci_high:.2f}x{runs}"


def _mem(value: float | None) -> str:
    return "NaN" if value is not None and math.isnan(value) else _f(value, ".1f")


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
            "vs": "" if o.spec.baseline else (o.baseline or "-"),
            "p50 ms": _f(b and b.latency_ms_p50, ".3f"),
            "p95 ms": _f(b and b.latency_ms_p95, ".3f"),
            "p50 spread": f"{b.latency_p50_spread_pct:.1f}% ({b.repeats}x)" if b else "-",
            "speed-up p50": "1.00x" if (o.spec.baseline and b) else _f(o.speedup_p50, ".2f") + ("x" if o.speedup_p50 else ""),
            "speed-up p95": "1.00x" if (o.spec.baseline and b) else _f(o.speedup_p95, ".2f") + ("x" if o.speedup_p95 else ""),
            "speed-up CI": _ci(o, "speedup"),
            "steady MB": _mem(b.rss_steady_mb) if b else "-",
            "peak MB": _mem(b.rss_peak_model_mb) if b else "-",
            "memory -%": "-" if o.memory_reduction is None else ("NaN" if math.isnan(o.memory_reduction)
                                                                 else f"{o.memory_reduction * 100:.0f}%"),
            "size MB": _f(b.size_bytes / 1e6 if b else (o.artifact.size_bytes / 1e6 if o.artifact else None), ".2f"),
            "accuracy": accuracy,
            "fidelity": fidelity,
            "verdict": verdict(o, selection),
        })
    return out


def _bound(g) -> str:
    """Generation tokens/s as a share of the memory-bandwidth bound; '-' where it does not apply."""
    if g is None or g.bandwidth_fraction is None:
        return "-"
    return "NaN" if math.isnan(g.bandwidth_fraction) else f"{g.bandwidth_fraction:.0%}"


def llm_rows(outcomes: Sequence[CandidateOutcome], selection: Selection | None = None) -> list[dict[str, str]]:
    """The rows of a language-model run (``LLM_COLUMNS``)."""
    out = []
    for o in outcomes:
        g, e = o.generation, o.llm_eval
        nr = bool(g and g.not_representative)
        size = g.size_bytes if g else (o.artifact.size_bytes if o.artifact else None)
        out.append({
            "candidate": o.name,
            "runs as": o.artifact.precision.upper() if o.artifact else "-",
            "vs": "" if o.spec.baseline else (o.baseline or "-"),
            "gen tok/s": _f(g and g.gen_tps, ".1f") + (NOT_REPRESENTATIVE if nr else ""),
            "bound": _bound(g),
            "prompt tok/s": _f(g and g.prompt_tps, ".0f") + (NOT_REPRESENTATIVE if nr else ""),
            "TTFT ms": _f(g and g.ttft_ms, ".1f") + (NOT_REPRESENTATIVE if nr else ""),
            "speed-up": ("1.00x" if (o.spec.baseline and g) else "not representative" if nr
                         else _f(o.speedup_p50, ".2f") + ("x" if o.speedup_p50 else "")),
            "speed-up CI": _ci(o, "speedup"),
            "peak RSS MB": _mem(g.rss_peak_mb) if g else "-",
            "model MB": _mem(g.rss_model_mb) if g else "-",
            "KV MB": (f"{g.kv_cache_mb:.1f} @{g.kv_context_tokens}" if g and g.kv_cache_mb is not None else "-"),
            "memory -%": "-" if o.memory_reduction is None else ("NaN" if math.isnan(o.memory_reduction)
                                                                 else f"{o.memory_reduction * 100:.0f}%"),
            "size MB": _f(size / 1e6 if size is not None else None, ".2f"),
            "perplexity": _f(e and e.perplexity, ".3f"),
            "KLD vs F16": _f(e and e.kld_mean, ".5f"),
            "KLD p99": _f(e and e.kld_p99, ".4f"),
            "top-1 agree": _f(e and e.top1_agreement, ".4f"),
            "verdict": verdict(o, selection),
        })
    return out


def spread_note(outcomes: Sequence[CandidateOutcome]) -> str | None:
    """What the speed-up intervals' run-to-run floor was in this run (None without one)."""
    spreads = {v.run_to_run_sd for o in outcomes for v in o.verdicts if v.gate == "speedup" and v.run_to_run_sd}
    if not spreads:
        return None
    pooled = sum(1 for o in outcomes for v in o.verdicts if v.gate == "speedup" and (v.runs_pooled or 1) > 1)
    note = (f"this host's run-to-run spread of speed-ups (±{math.expm1(max(spreads)):.0%}, ×/÷ e^(z·"
            f"{max(spreads):.3f})): a speed-up verdict settles only when another run here would agree")
    if pooled:
        note += (f"; {pooled} speed-up(s) measured in earlier runs here are judged on all those runs "
                 "(their CI says how many), the band narrowing as 1/√runs")
    held = sum(1 for o in outcomes for v in o.verdicts if v.gate == "speedup" and v.held_from_run is not None)
    if held:
        note += (f"; {held} verdict(s) whose pooled interval straddles the threshold keep the decision the runs up "
                 "to 'held from run k' settled here: only evidence settling the other way reverses it")
    return note


def per_sample_note(inputs: Sequence[str]) -> str:
    """The line that says which inputs ran at each sample's own shape (a folder of per-sample feeds)."""
    return (f"per-sample shapes: {', '.join(inputs)} ran at each sample's own shape (the shape above is the first "
            "sample's); the baseline and every candidate ran the same files in the same order")


def shape_settings_note(first: dict, extra: Sequence[tuple[str, dict]]) -> str:
    """The line that says which shape settings were measured and how they combine into a verdict."""
    from edgeopt.input_shapes import describe

    labels = ", ".join(f"-{label} ({describe(at)})" for label, at in extra)
    return (f"shape settings: each candidate's own row at {describe(first)}, its rows {labels} at the other shapes, "
            "each against the baseline at the same shape; a candidate passes only if it passes at every shape "
            "(gate every-shape)")


def synthetic_note(roles: Sequence[str]) -> str:
    """The line that says which data was generated (``--synthetic-data``)."""
    return (f"{' and '.join(roles)} on generated inputs (--synthetic-data: random N(0, 1) values at the input "
            "shapes, no labels); accuracy figures compare candidates with the baseline on those, not on real data")


def _misses_failures_verdicts(outcomes: Sequence[CandidateOutcome], selection: Selection) -> list[str]:
    """The report's sections after its table: nearest misses, failures, every gate verdict."""
    lines: list[str] = []
    if selection.nearest_misses:
        lines += ["", "**Nearest misses**", ""] + [f"- {m}" for m in selection.nearest_misses]
    failures = [o for o in outcomes if o.failure]
    if failures:
        lines += ["", "**Failures**", ""] + [f"- {o.name}: `{o.failure.reason}` at {o.failure.stage}: {o.failure.message}"
                                             for o in failures]
    verdicts = [o for o in outcomes if o.verdicts]
    if verdicts:
        lines += ["", "**Gate verdicts**", ""] + [f"- {o.name}: " + "; ".join(v.describe() for v in o.verdicts)
                                                  for o in verdicts]
    return lines


def markdown(outcomes: Sequence[CandidateOutcome], selection: Selection, *, title: str, links: dict[str, str]) -> str:
    note = spread_note(outcomes)
    floor = f", and at least as wide as {note}" if note else ""
    if any(o.generation for o in outcomes):
        return _llm_markdown(outcomes, selection, title=title, links=links)
    lines = [f"# {title}", "", f"**{selection.message}**", "",
             ("Speed-up CI: 95% interval over the interleaved rounds (Student's t over the paired per-round "
              f"ratios){floor}; a gate passes only when "
             "its whole interval clears the threshold. steady MB: resident memory of the loaded, warmed-up model; "
             "peak MB: high-water mark during load and inference above the runtime's own memory."), ""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "---|" * len(COLUMNS))
    for r in rows(outcomes, selection):
        lines.append("| " + " | ".join(r[c] for c in COLUMNS) + " |")
    sources = sorted({o.benchmark.memory_source for o in outcomes if o.benchmark and o.benchmark.memory_source})
    if sources:
        lines += ["", f"Memory figures: {'; '.join(sources)}."]
    lines += _misses_failures_verdicts(outcomes, selection)
    baselines = [o for o in outcomes if o.spec.baseline and o.benchmark]
    if len(baselines) > 1:
        lines += ["", ("**Baselines** (each candidate's ratios use the baseline in its `vs` column: same inputs, "
                  "sequence shapes and threads, measured interleaved with it)"), ""]
        lines += [f"- {o.name}: sequence {o.benchmark.sequence}, {o.benchmark.threads} thread(s), "
                  f"p50 {o.benchmark.latency_ms_p50:.3f} ms" for o in baselines]
    if selection.frontier:
        lines += ["", f"Pareto frontier (p95 latency, quality, model RSS, size): {', '.join(selection.frontier)}"]
    if links:
        lines += [""] + [f"- {k}: {v}" for k, v in links.items()]
    return "\n".join(lines) + "\n"


def _chart_points(outcomes: Sequence[CandidateOutcome]) -> tuple[str, list[tuple[str, float, float]]]:
    """(y label, [(name, p50 ms, y)]) of the measured candidates: y is the quality metric when every one
    has it, else the size in MB."""
    measured = [o for o in outcomes if o.benchmark is not None and not o.failure]
    if measured and all(o.evaluation is not None for o in measured):
        label = measured[0].evaluation.metric.replace("_", " ")
        return label, [(o.name, o.benchmark.latency_ms_p50, o.evaluation.value) for o in measured]
    return "size MB", [(o.name, o.benchmark.latency_ms_p50, o.benchmark.size_bytes / 1e6) for o in measured]


def pareto_chart_svg(outcomes: Sequence[CandidateOutcome], selection: Selection, *, title: str = "") -> str | None:
    """A scatter of the measured candidates (p50 latency against quality, or size) as a standalone SVG:
    the Pareto frontier filled, the others hollow, the selected one in orange. None with nothing measured."""
    ylabel, pts = _chart_points(outcomes)
    if not pts:
        return None
    w, h, left, right, top, bottom = 640, 400, 70, 190, 40, 50
    xs, ys = [p[1] for p in pts], [p[2] for p in pts]
    x0, x1 = min(0.0, min(xs)), max(xs) * 1.1 or 1.0
    pad = (max(ys) - min(ys)) * 0.1 or abs(max(ys)) * 0.05 or 1.0
    y0, y1 = min(ys) - pad, max(ys) + pad

    def sx(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * (w - left - right)

    def sy(v: float) -> float:
        return h - bottom - (v - y0) / (y1 - y0) * (h - top - bottom)

    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
           'font-family="sans-serif" font-size="12">'), f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{left}" y="22" font-size="14">{escape(title or "Pareto frontier")}</text>',
           f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" stroke="black"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="black"/>',
           f'<text x="{(left + w - right) / 2}" y="{h - 12}" text-anchor="middle">p50 latency (ms)</text>',
           (f'<text x="16" y="{(top + h - bottom) / 2}" text-anchor="middle" '
           f'transform="rotate(-90 16 {(top + h - bottom) / 2})">{escape(ylabel)}</text>')]
    for i in range(5):
        xv, yv = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        out.append(f'<text x="{sx(xv):.1f}" y="{h - bottom + 16}" text-anchor="middle">{xv:.3g}</text>')
        out.append(f'<text x="{left - 6}" y="{sy(yv) + 4:.1f}" text-anchor="end">{yv:.3g}</text>')
    for name, xv, yv in pts:
        on = name in selection.frontier
        color = "#e8710a" if name == selection.selected else "#1a73e8"
        out.append(f'<circle cx="{sx(xv):.1f}" cy="{sy(yv):.1f}" r="6" stroke="{color}" stroke-width="2" '
                   f'fill="{color if on else "white"}"><title>{escape(name)}</title></circle>')
        out.append(f'<text x="{sx(xv) + 9:.1f}" y="{sy(yv) + 4:.1f}">{escape(name)}'
                   f'{" (selected)" if name == selection.selected else ""}</text>')
    out.append(f'<text x="{w - right + 10}" y="{top + 10}">filled: on the frontier</text>')
    out.append("</svg>")
    return "\n".join(out)


def pareto_chart_markdown(outcomes: Sequence[CandidateOutcome], selection: Selection, *, title: str) -> str | None:
    """The chart as Markdown (an embedded SVG image) with its points listed below it, for a Prefect artifact."""
    svg = pareto_chart_svg(outcomes, selection, title=title)
    if svg is None:
        return None
    ylabel, pts = _chart_points(outcomes)
    data = base64.b64encode(svg.encode("utf-8")).decode("ascii")
    lines = [f"# {title}", "", f"![Pareto chart: p50 latency against {ylabel}](data:image/svg+xml;base64,{data})", "",
             f"| candidate | p50 ms | {ylabel} | frontier |", "|---|---|---|---|"]
    lines += [f"| {n} | {x:.3f} | {y:.4g} | {'selected' if n == selection.selected else ('yes' if n in selection.frontier else '')} |"
              for n, x, y in pts]
    return "\n".join(lines) + "\n"


def _llm_markdown(outcomes: Sequence[CandidateOutcome], selection: Selection, *, title: str,
                  links: dict[str, str]) -> str:
    g = next(o.generation for o in outcomes if o.generation)
    lines = [f"# {title}", "", f"**{selection.message}**", "",
             (f"Generation: the same {g.prompt_tokens}-token prompt, {g.gen_tokens} generated tokens and "
              f"{g.threads} thread(s) for the F16 reference and every candidate, each measurement in a fresh "
              "process, rounds interleaved; speed-up = generation tokens/s / the reference's in the same run, its "
              "CI over the paired per-round ratios. Perplexity on the evaluation text; KLD and top-1 agreement "
              "against the F16 reference on the same positions."), ""]
    lines.append("| " + " | ".join(LLM_COLUMNS) + " |")
    lines.append("|" + "---|" * len(LLM_COLUMNS))
    for r in llm_rows(outcomes, selection):
        lines.append("| " + " | ".join(r[c] for c in LLM_COLUMNS) + " |")
    caveats = {o.name: o.generation.not_representative for o in outcomes
               if o.generation and o.generation.not_representative}
    if caveats:
        lines += ["", "(n/r) speed figures that are not representative of the target; the speed-up gate does not "
                  "pass on them: " + "; ".join(f"{n}: {c}" for n, c in caveats.items())]
    lines += _misses_failures_verdicts(outcomes, selection)
    notes = [f"- {o.name}: " + "; ".join(o.artifact.notes) for o in outcomes if o.artifact and o.artifact.notes]
    if notes:
        lines += ["", "**Builds**", ""] + notes
    if selection.frontier:
        frontier = ", ".join(selection.frontier)
        lines += ["", f"Pareto frontier (time per token, top-1 agreement, model RSS, size): {frontier}"]
    if links:
        lines += [""] + [f"- {k}: {v}" for k, v in links.items()]
    return "\n".join(lines) + "\n"
