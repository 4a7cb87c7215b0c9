"""The Pareto chart of an optimize run (edgeopt.report): an SVG the Prefect UI shows as a Markdown artifact."""

from __future__ import annotations

import base64
import xml.etree.ElementTree as ET

from edgeopt import report
from edgeopt.pareto import select
from edgeopt.profiles import Objective
from tests.test_pareto import BASELINE, cand

NS = "{http://www.w3.org/2000/svg}"


def test_pareto_chart_marks_the_frontier_and_the_selection():
    outcomes = [BASELINE, cand("fast", p50=5.0, acc=0.89), cand("slow", p50=15.0, acc=0.88)]
    selection = select(outcomes, objective=Objective())
    svg = ET.fromstring(report.pareto_chart_svg(outcomes, selection, title="t"))
    circles = {c.find(f"{NS}title").text: c for c in svg.iter(f"{NS}circle")}
    assert set(circles) == {"baseline-fp32", "fast", "slow"}
    for name, c in circles.items():  # filled on the frontier, hollow off it; the selected one in orange
        assert (c.get("fill") != "white") == (name in selection.frontier), name
        assert (c.get("stroke") == "#e8710a") == (name == selection.selected), name
    # x grows with latency
    assert float(circles["fast"].get("cx")) < float(circles["slow"].get("cx")) < float(circles["baseline-fp32"].get("cx"))
    md = report.pareto_chart_markdown(outcomes, selection, title="t")
    data = md.split("data:image/svg+xml;base64,")[1].split(")")[0]
    assert base64.b64decode(data).decode().startswith("<svg")
    assert "| fast | 5.000 | 0.89 |" in md


def test_no_chart_without_a_measured_candidate():
    failed = BASELINE.model_copy(update={"benchmark": None})
    assert report.pareto_chart_svg([failed], select([failed], objective=Objective())) is None
