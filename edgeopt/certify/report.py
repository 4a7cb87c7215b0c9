"""The certification report: one self-contained HTML page and a JSON twin with the same content.

``render`` writes, into ``out_dir``:

- ``certification.html``: no scripts, no network (inline CSS, system fonts); the verdict banner
  (``id="verdict"``), the verdict table (``id="checks"``), the cross-validation matrix (``id="matrix"``)
  when given, the manifest digest, the hardware fingerprint and tool versions, each check's evidence;
- ``latency.png`` / ``soak.png``: the charts, as files beside the page referenced by relative ``src``
  (MLflow's artifact viewer shows the folder as it is; a data: URI would bloat the page and hide the
  charts from the artifact list). A chart without data is not drawn: the page says "not measured"
  in its place, and a chart file left by an earlier render into the same folder is removed;
- ``certification.json``: ``Certification.model_dump(mode="json")`` plus ``certified``,
  ``failed_checks``, ``crossval``, ``charts`` (file names or null) and the latency percentiles drawn.
  NaN and infinities are written as ``null``.
"""

from __future__ import annotations

import html
import json
import logging
import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edgeopt.certify.records import Certification, CheckResult, CrossValidation, MatrixCell

__all__ = ["CHART_FILES", "HTML_NAME", "JSON_NAME", "render"]

logger = logging.getLogger(__name__)

HTML_NAME = "certification.html"
JSON_NAME = "certification.json"
#: chart name → file written beside the page (and the ``id`` of its ``<img>``: ``chart-<name>``)
CHART_FILES = {"latency": "latency.png", "soak": "soak.png"}
_PERCENTILES = (50, 95, 99)

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:2rem;color:#1b1f24}
h1{font-size:1.5rem;margin-bottom:.2rem} h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #d0d7de}
.meta{color:#57606a;margin-top:0}
#verdict{font-size:2rem;font-weight:700;padding:1rem 1.5rem;border-radius:8px;margin:1rem 0}
#verdict.certified{background:#dafbe1;color:#116329;border:2px solid #2da44e}
#verdict.not-certified{background:#ffebe9;color:#82071e;border:2px solid #cf222e}
#verdict .failed{display:block;font-size:1rem;font-weight:400;margin-top:.3rem}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}
th,td{border:1px solid #d0d7de;padding:.3rem .6rem;text-align:left;vertical-align:top}
th{background:#f6f8fa} td.num{text-align:right;font-variant-numeric:tabular-nums}
.status-pass,.status-ok{color:#116329;font-weight:600}
.status-fail,.status-failed,.status-unfaithful,.status-not-reproducible{color:#82071e;font-weight:600}
.status-not-applicable{color:#57606a}
.not-measured{color:#57606a;font-style:italic;border:1px dashed #d0d7de;padding:1rem;max-width:40rem}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.85rem}
pre{background:#f6f8fa;padding:.6rem;overflow-x:auto;max-width:70rem}
img.chart{max-width:100%;border:1px solid #d0d7de}
"""


def render(*, certification: Certification, out_dir: Path, crossval: CrossValidation | None = None,
           latency_samples_ms: Sequence[float] | None = None,
           soak_series: Sequence[Mapping[str, float]] | None = None) -> tuple[Path, Path]:
    """Write the certification page, its charts and its JSON twin into ``out_dir``.

    Returns ``(html_path, json_path)``: ``out_dir / "certification.html"``, ``out_dir / "certification.json"``.
    ``soak_series`` items may carry ``t_s``, ``p50_ms``, ``p99_ms``, ``rss_mb``; missing keys are tolerated.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = [float(v) for v in (latency_samples_ms or ()) if math.isfinite(float(v))]
    percentiles = _percentiles(samples)
    charts = {
        "latency": _latency_chart(samples, percentiles, out_dir / CHART_FILES["latency"]),
        "soak": _soak_chart(soak_series or (), out_dir / CHART_FILES["soak"]),
    }
    for name, drawn in charts.items():
        if not drawn:
            (out_dir / CHART_FILES[name]).unlink(missing_ok=True)  # a stale chart must not pass for this run's
    chart_files = {name: CHART_FILES[name] if drawn else None for name, drawn in charts.items()}

    data = certification.model_dump(mode="json", fallback=_fallback)
    data.update({
        "certified": certification.certified,
        "failed_checks": list(certification.failed_checks),
        "crossval": crossval.model_dump(mode="json", fallback=_fallback) if crossval is not None else None,
        "charts": chart_files,
        "latency_ms": {"samples": len(samples), **{f"p{q}": v for q, v in percentiles.items()}},
    })
    json_path = out_dir / JSON_NAME
    json_path.write_text(json.dumps(_jsonable(data), indent=2, allow_nan=False, default=str) + "\n", encoding="utf-8")

    html_path = out_dir / HTML_NAME
    html_path.write_text(_page(certification, crossval, chart_files, len(samples), percentiles), encoding="utf-8")
    logger.info("certification report for %s v%s: %s (%s)", certification.subject.model_name,
                certification.subject.version, html_path,
                "certified" if certification.certified else "not certified")
    return html_path, json_path


# ---------------------------------------------------------------------------------------------- data

def _jsonable(value: Any) -> Any:
    """``value`` with NaN / ±inf replaced by None (JSON has no NaN), numpy scalars as Python numbers and
    tuples as lists."""
    if isinstance(value, bool | None | str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _fallback(value: Any) -> Any:
    """What pydantic cannot serialize in ``evidence`` (numpy scalars and arrays, paths...): as Python."""
    item = getattr(value, "tolist", None)  # numpy scalars and arrays
    return item() if callable(item) else str(value)


def _percentiles(samples: Sequence[float]) -> dict[int, float]:
    if not samples:
        return {}
    import numpy as np

    return {q: float(np.percentile(samples, q)) for q in _PERCENTILES}


def _column(series: Sequence[Mapping[str, float]], key: str) -> list[float]:
    out = []
    for point in series:
        try:
            out.append(float(point[key]))
        except (KeyError, TypeError, ValueError):
            out.append(math.nan)
    return out


def _any_finite(values: Sequence[float]) -> bool:
    return any(math.isfinite(v) for v in values)


# -------------------------------------------------------------------------------------------- charts

def _figure(*, rows: int = 1, height: float = 4.0) -> tuple[Any, Any]:
    """A figure on the Agg canvas, outside pyplot: no global backend switch, nothing left open."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.0, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    return fig, axes


def _latency_chart(samples: Sequence[float], percentiles: Mapping[int, float], path: Path) -> bool:
    if not samples:
        return False
    fig, (ax,) = _figure()
    ax.hist(samples, bins=min(60, max(10, len(samples) // 20)), color="#8c959f", edgecolor="white")
    for (q, value), color in zip(percentiles.items(), ("#0969da", "#bf8700", "#cf222e"), strict=True):
        ax.axvline(value, color=color, linestyle="--", linewidth=1.5, label=f"p{q} {value:.3f} ms")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("runs")
    ax.set_title(f"Latency distribution ({len(samples)} samples)")
    ax.legend()
    fig.savefig(path, format="png")
    return True


def _soak_chart(series: Sequence[Mapping[str, float]], path: Path) -> bool:
    lat = {key: _column(series, key) for key in ("p50_ms", "p99_ms")}
    lat = {key: values for key, values in lat.items() if _any_finite(values)}
    rss = _column(series, "rss_mb")
    panels = (["latency"] if lat else []) + (["rss"] if _any_finite(rss) else [])
    if not panels:
        return False
    t = _column(series, "t_s")
    x, xlabel = (t, "time (s)") if _any_finite(t) else (list(range(len(series))), "sample")
    fig, axes = _figure(rows=len(panels), height=3.2 * len(panels))
    for ax, panel in zip(axes, panels, strict=True):
        if panel == "latency":
            for key, color in (("p50_ms", "#0969da"), ("p99_ms", "#cf222e")):
                if key in lat:
                    ax.plot(x, lat[key], color=color, marker=".", label=key.replace("_ms", ""))
            ax.set_ylabel("latency (ms)")
            ax.set_title("Soak: latency over time")
            ax.legend()
        else:
            ax.plot(x, rss, color="#8250df", marker=".", label="RSS")
            ax.set_ylabel("RSS (MB)")
            # absolute MB, at least 8 MB of span: a page or two of growth must not look like a leak
            ax.ticklabel_format(axis="y", useOffset=False, style="plain")
            finite = [v for v in rss if v is not None and math.isfinite(v)]
            mid = (max(finite) + min(finite)) / 2
            half = max(4.0, (max(finite) - min(finite)) * 0.6)
            ax.set_ylim(mid - half, mid + half)
            ax.set_title("Soak: resident memory over time")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel(xlabel)
    fig.savefig(path, format="png")
    return True


# ---------------------------------------------------------------------------------------------- html

def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: float | None, fmt: str = ".3f", suffix: str = "") -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return format(value, fmt) + suffix


def _with_ci(value: float, ci: tuple[float, float], fmt: str, suffix: str = "") -> str:
    text = _num(value, fmt, suffix)
    if all(math.isfinite(v) for v in ci):
        text += f" [{ci[0]:{fmt}}, {ci[1]:{fmt}}]"
    return text


def _table(table_id: str, headers: Sequence[str], rows: Sequence[str]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "\n".join(rows) if rows else f'<tr><td colspan="{len(headers)}">none</td></tr>'
    return f'<table id="{table_id}">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>'


def _kv_table(table_id: str, items: Mapping[str, Any]) -> str:
    rows = [f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in items.items()]
    return _table(table_id, ("", ""), rows).replace("<thead><tr><th></th><th></th></tr></thead>\n", "")


def _check_row(c: CheckResult) -> str:
    return (f'<tr data-check="{_e(c.check)}" data-status="{_e(c.status)}"><td>{_e(c.check)}</td>'
            f'<td class="status-{_e(c.status)}">{_e(c.status)}</td><td>{_e(c.summary)}</td>'
            f'<td>{_e(c.reason or "")}</td><td class="num">{_e(_num(c.duration_s, ".1f", " s"))}</td></tr>')


def _cell_row(m: MatrixCell) -> str:
    placement = "-" if m.placement_share is None else _num(100 * m.placement_share, ".0f", "%")
    status = _e(m.status) + (f"<br><small>{_e(m.message)}</small>" if m.message else "")
    nums = (_with_ci(m.latency_ms_p50, m.latency_ms_p50_ci, ".3f"), _with_ci(m.speedup_p50, m.speedup_ci, ".2f", "x"),
            _num(m.cosine_vs_baseline, ".5f"), _num(m.top1_vs_baseline, ".4f"), _num(m.max_abs_vs_baseline, ".3g"),
            placement)
    return (f'<tr data-runtime="{_e(m.runtime)}" data-device="{_e(m.device)}" data-status="{_e(m.status)}">'
            f'<td>{_e(m.runtime)}</td><td>{_e(m.device)}</td><td class="status-{_e(m.status)}">{status}</td>'
            + "".join(f'<td class="num">{_e(n)}</td>' for n in nums) + "</tr>")


def _chart(name: str, file: str | None, alt: str, what: str) -> str:
    if file is None:
        return f'<p id="chart-{name}-missing" class="not-measured">{_e(what)}: not measured</p>'
    return f'<p><img id="chart-{name}" class="chart" src="{_e(file)}" alt="{_e(alt)}"></p>'


def _verdict(cert: Certification) -> str:
    if cert.certified:
        return '<div id="verdict" class="certified">CERTIFIED</div>'
    failed = cert.failed_checks
    detail = ("failed: " + ", ".join(failed)) if failed else "no checks were run"
    return f'<div id="verdict" class="not-certified">NOT CERTIFIED<span class="failed">{_e(detail)}</span></div>'


def _crossval_section(cv: CrossValidation | None, cert: Certification) -> str:
    if cv is None:
        return '<h2>Cross-validation</h2>\n<p class="not-measured" id="matrix-missing">Cross-validation: not measured</p>'
    headers = ("runtime", "device", "status", "p50 ms [CI]", "speed-up p50 [CI]", "cosine", "top-1",
               "max abs", "placement")
    parts = ["<h2>Cross-validation</h2>",
             (f'<p id="matrix-verdict">verdict: <span class="status-{_e(cv.verdict)}">{_e(cv.verdict)}</span>'
              f" &middot; reproducible: {_e({None: 'n/a', True: 'yes', False: 'no'}[cv.reproducible])}"
              f" &middot; host {_e(cv.hardware.hostname)} ({_e(cv.hardware.cpu_model)})</p>")]
    if (cv.subject.model_name, cv.subject.version) != (cert.subject.model_name, cert.subject.version):
        parts.append(f'<p class="status-fail">This matrix is of {_e(cv.subject.model_name)} '
                     f"v{_e(cv.subject.version)}, not of the certified version.</p>")
    if cv.summary:
        parts.append(f"<p>{_e(cv.summary)}</p>")
    parts.append(_table("matrix", headers, [_cell_row(m) for m in cv.cells]))
    if cv.agreement:
        parts.append(_table("agreement", ("pair", "mean cosine"),
                            [f'<tr><td>{_e(k)}</td><td class="num">{_e(_num(v, ".5f"))}</td></tr>'
                             for k, v in cv.agreement.items()]))
    return "\n".join(parts)


def _evidence(checks: Sequence[CheckResult]) -> str:
    parts = ["<h2>Evidence</h2>"]
    for c in checks:
        body = json.dumps(_jsonable(c.evidence), indent=2, allow_nan=False, default=str)
        files = "".join(f"<li><code>{_e(f)}</code></li>" for f in c.files)
        parts.append(f"<details><summary>{_e(c.check)}</summary><pre>{_e(body)}</pre>"
                     + (f"<p>files:</p><ul>{files}</ul>" if files else "") + "</details>")
    return "\n".join(parts)


def _page(cert: Certification, cv: CrossValidation | None, charts: Mapping[str, str | None], n_samples: int,
          percentiles: Mapping[int, float]) -> str:
    s, hw = cert.subject, cert.hardware
    title = f"Certification: {s.model_name} v{s.version} ({s.profile})"
    subject = {
        "model": f"{s.model_name} v{s.version}", "profile": s.profile, "kind": s.kind,
        "artifact": f"{s.artifact.candidate} ({s.artifact.backend}, {s.artifact.precision})",
        "artifact path": s.artifact.path, "artifact sha256": s.artifact.sha256,
        "artifact size": f"{s.artifact.size_bytes:,} bytes",
        "baseline": f"{s.baseline.candidate} ({s.baseline.backend}, {s.baseline.precision})",
        "baseline sha256": s.baseline.sha256,
        "inputs": "; ".join(f"{t.name} {t.dtype} {list(t.shape)}" for t in s.signature) or "-",
        "certified at": cert.created_utc,
    }
    hardware = {
        "host": hw.hostname, "os": hw.os, "arch": hw.arch, "cpu": hw.cpu_model,
        "ISA flags": " ".join(hw.isa_flags) or "-",
        "cores": f"{hw.cores_physical} physical / {hw.cores_logical} logical", "RAM": f"{hw.ram_mb:,} MB",
        "GPUs": "; ".join(hw.gpus) or "none", "python": hw.python,
    }
    tools = sorted(set(hw.tool_versions) | set(s.artifact.tool_versions))
    tool_rows = [f"<tr><td>{_e(t)}</td><td>{_e(hw.tool_versions.get(t, '-'))}</td>"
                 f"<td>{_e(s.artifact.tool_versions.get(t, '-'))}</td></tr>" for t in tools]
    manifest = (f'<p id="manifest">manifest sha256: <code>{_e(cert.manifest_sha256)}</code></p>'
                if cert.manifest_sha256 else '<p id="manifest" class="status-fail">no signed manifest</p>')
    lat_line = (f'<p id="latency-summary">{n_samples} samples: '
                + ", ".join(f"p{q} {v:.3f} ms" for q, v in percentiles.items()) + "</p>") if n_samples else ""
    body = [
        f"<h1>{_e(title)}</h1>",
        (f'<p class="meta">{_e(s.artifact.candidate)} &middot; certified at {_e(cert.created_utc)} '
         f"on {_e(hw.hostname)}</p>"),
        _verdict(cert),
        "<h2>Checks</h2>",
        _table("checks", ("check", "status", "summary", "reason", "duration"), [_check_row(c) for c in cert.checks]),
        _crossval_section(cv, cert),
        "<h2>Latency</h2>",
        lat_line,
        _chart("latency", charts["latency"], "latency distribution", "Latency distribution"),
        "<h2>Soak</h2>",
        _chart("soak", charts["soak"], "p50 / p99 latency and RSS over time", "Soak series"),
        "<h2>Manifest</h2>",
        manifest,
        "<h2>Subject</h2>",
        _kv_table("subject", subject),
        "<h2>Hardware</h2>",
        _kv_table("hardware", hardware),
        "<h2>Tool versions</h2>",
        _table("tools", ("tool", "measuring host", "artifact built with"), tool_rows),
        _evidence(cert.checks),
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(part for part in body if part) + "\n</body>\n</html>\n")
