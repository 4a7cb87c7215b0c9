"""The certification report: its JSON twin, and the page as headless Chromium renders it.

The page is served over HTTP from a temporary folder (same origin, so a test-only probe page can read
the report in an iframe and record each image's ``naturalWidth`` without the report carrying any
script). A screenshot of the report proves it paints: the verdict banner's colour and the histogram
bars' colour must be on it.
"""

from __future__ import annotations

import functools
import hashlib
import html
import http.server
import json
import math
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgeopt.certify.records import Certification, CheckResult, CrossValidation, MatrixCell, Subject
from edgeopt.certify.report import render
from edgeopt.hardware import fingerprint
from edgeopt.records import Artifact, TensorSpec
from tests.conftest import make_tiny_cnn

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary on PATH (Debian/Ubuntu: apt-get install -y chromium)")

HOSTILE = '<script>alert("x")</script> & co'


# ------------------------------------------------------------------------------------------- records

def _artifact(path: Path, *, candidate: str, backend: str, precision: str, parent: str) -> Artifact:
    data = path.read_bytes()
    return Artifact(candidate=candidate, backend=backend, path=str(path), sha256=hashlib.sha256(data).hexdigest(),
                    size_bytes=len(data), parent_sha256=parent, precision=precision,
                    tool_versions={"onnxruntime": "1.31.0", "onnx": "1.23.0"})


@pytest.fixture(scope="module")
def subject(tmp_path_factory: pytest.TempPathFactory) -> Subject:
    d = tmp_path_factory.mktemp("models")
    base_path = make_tiny_cnn(d / "model.onnx")
    cand_path = make_tiny_cnn(d / "ort-int8-dynamic.onnx", seed=1)
    baseline = _artifact(base_path, candidate="baseline", backend="onnxruntime", precision="fp32", parent="")
    artifact = _artifact(cand_path, candidate="ort-int8-dynamic", backend="onnxruntime", precision="int8",
                         parent=baseline.sha256)
    return Subject(model_name="digits-cnn", version="7", artifact=artifact, baseline=baseline,
                   signature=(TensorSpec(name="input", dtype="float32", shape=("batch", 1, 8, 8)),),
                   kind="cnn", profile="intel-cpu", gates={"accuracy_delta_min": -0.01, "speedup_min": 1.2},
                   recorded={"speedup_p50": 1.8, "speedup_p50_ci_low": 1.6, "speedup_p50_ci_high": 2.0})


def _checks(*, accuracy_fails: bool) -> tuple[CheckResult, ...]:
    accuracy = (
        CheckResult(check="accuracy", status="fail", summary="top-1 0.912 [0.899, 0.925] vs baseline 0.948",
                    reason="delta -0.036 is below the gate -0.01 (whole interval below)",
                    evidence={"value": 0.912, "ci": [0.899, 0.925], "samples": 1797}, duration_s=4.2)
        if accuracy_fails else
        CheckResult(check="accuracy", status="pass", summary="top-1 0.946 [0.934, 0.957] vs baseline 0.948",
                    evidence={"value": 0.946, "ci": [0.934, 0.957], "samples": 1797}, duration_s=4.1))
    return (
        CheckResult(check="data-quality", status="pass", summary="12/12 expectations met on 1797 rows",
                    evidence={"expectations": 12, "unexpected_pct": np.float32(0.0)}, duration_s=3.6),
        accuracy,
        CheckResult(check="robustness", status="not-applicable", summary=HOSTILE,
                    reason="no perturbation suite for kind 'cnn' with 8x8 inputs",
                    evidence={"worst_cosine": math.nan}),  # duration NaN: not measured
        CheckResult(check="soak", status="pass", summary="p99 drift +2.1% over 60 s; RSS growth 0.4 MB",
                    evidence={"p99_drift_pct": 2.1, "rss_growth_mb": 0.4}, files=("soak.csv",), duration_s=61.0),
        CheckResult(check="provenance", status="pass", summary="manifest signed and verified",
                    evidence={"files": 2}, duration_s=0.3),
    )


def _certification(subject: Subject, *, accuracy_fails: bool = False) -> Certification:
    return Certification(subject=subject, checks=_checks(accuracy_fails=accuracy_fails), hardware=fingerprint(),
                         created_utc="2026-11-22T03:14:15+00:00", manifest_sha256="ab" * 32)


def _crossval(subject: Subject) -> CrossValidation:
    cells = (
        MatrixCell(runtime="onnxruntime", device="CPU", status="ok", latency_ms_p50=0.081,
                   latency_ms_p50_ci=(0.079, 0.083), speedup_p50=1.79, speedup_ci=(1.62, 1.97), rounds=3,
                   cosine_vs_baseline=0.99931, top1_vs_baseline=0.994, max_abs_vs_baseline=0.021,
                   placement_share=1.0),
        MatrixCell(runtime="openvino", device="CPU", status="failed", message="unsupported op: DynamicQuantizeLinear"),
    )
    return CrossValidation(subject=subject, hardware=fingerprint(), cells=cells,
                           agreement={"onnxruntime/CPU~openvino/CPU": math.nan}, reproducible=True,
                           verdict="pass", summary="speed-up reproduced on onnxruntime/CPU")


def _latency() -> list[float]:
    rng = np.random.default_rng(0)
    return (0.08 + rng.gamma(2.0, 0.004, 2000)).tolist()


def _soak() -> list[dict[str, float]]:
    series = [{"t_s": 2.0 * i, "p50_ms": 0.081 + 0.0002 * i, "p99_ms": 0.12 + 0.0005 * (i % 7), "rss_mb": 180 + 0.01 * i}
              for i in range(31)]
    del series[5]["p99_ms"]  # a missing key is tolerated (a gap)
    return series


def _strict_json(path: Path) -> dict:
    def no_constants(name: str) -> None:
        raise AssertionError(f"{path.name} holds a bare {name}")
    return json.loads(path.read_text(encoding="utf-8"), parse_constant=no_constants)


# --------------------------------------------------------------------------------------------- JSON

def test_json_twin(subject: Subject, tmp_path: Path) -> None:
    cert = _certification(subject)
    html_path, json_path = render(certification=cert, out_dir=tmp_path, crossval=_crossval(subject),
                                  latency_samples_ms=_latency(), soak_series=_soak())
    assert (html_path, json_path) == (tmp_path / "certification.html", tmp_path / "certification.json")
    data = _strict_json(json_path)
    assert data["certified"] is True and data["failed_checks"] == []
    assert data["manifest_sha256"] == "ab" * 32
    assert data["charts"] == {"latency": "latency.png", "soak": "soak.png"}
    assert (tmp_path / "latency.png").stat().st_size > 1000 and (tmp_path / "soak.png").stat().st_size > 1000
    robustness = next(c for c in data["checks"] if c["check"] == "robustness")
    assert data["checks"][0]["evidence"]["unexpected_pct"] == 0.0  # a numpy scalar in the evidence
    assert robustness["duration_s"] is None and robustness["evidence"]["worst_cosine"] is None
    assert data["subject"]["artifact"]["sha256"] == subject.artifact.sha256
    assert data["hardware"]["cpu_model"] == fingerprint().cpu_model
    failed_cell = data["crossval"]["cells"][1]
    assert failed_cell["latency_ms_p50"] is None and failed_cell["speedup_ci"] == [None, None]
    assert data["crossval"]["agreement"] == {"onnxruntime/CPU~openvino/CPU": None}
    lat = data["latency_ms"]
    assert lat["samples"] == 2000 and lat["p50"] < lat["p95"] < lat["p99"]
    assert lat["p99"] == pytest.approx(float(np.percentile(_latency(), 99)))

    page = html_path.read_text(encoding="utf-8")
    assert "<script" not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; co" in page
    assert "http://" not in page and "https://" not in page  # nothing fetched from the network


def test_json_failing_without_charts(subject: Subject, tmp_path: Path) -> None:
    render(certification=_certification(subject), out_dir=tmp_path, latency_samples_ms=_latency(),
           soak_series=_soak())
    # a second render into the same folder with no data must not leave the first run's charts behind
    html_path, json_path = render(certification=_certification(subject, accuracy_fails=True), out_dir=tmp_path,
                                  latency_samples_ms=[math.nan], soak_series=[{"t_s": 1.0}])
    data = _strict_json(json_path)
    assert data["certified"] is False and data["failed_checks"] == ["accuracy"]
    assert data["charts"] == {"latency": None, "soak": None} and data["crossval"] is None
    assert data["latency_ms"] == {"samples": 0}
    assert not (tmp_path / "latency.png").exists() and not (tmp_path / "soak.png").exists()
    page = html_path.read_text(encoding="utf-8")
    assert "<img" not in page and page.count("not measured") >= 3  # latency, soak, cross-validation


# ----------------------------------------------------------------------------------------- Chromium

PROBE = """<!DOCTYPE html><html><body>
<iframe id="report" src="report/certification.html" width="1280" height="1600"></iframe>
<pre id="probe">pending</pre>
<script>
const frame = document.getElementById("report");
frame.addEventListener("load", () => {
  const d = frame.contentDocument;
  const imgs = Array.from(d.images).map(i => ({id: i.id, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight}));
  const verdict = d.getElementById("verdict");
  document.getElementById("probe").textContent = JSON.stringify({
    verdict: verdict ? verdict.innerText : null, imgs: imgs, text: d.body.innerText,
    checks: d.querySelectorAll("#checks tbody tr").length, matrix: d.querySelectorAll("#matrix tbody tr").length});
});
</script></body></html>
"""


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """``(report folder, base URL)``: tmp_path served on a free localhost port, the probe page at its root."""
    (tmp_path / "probe.html").write_text(PROBE, encoding="utf-8")
    out_dir = tmp_path / "report"

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Quiet, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield out_dir, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _chromium(*args: str, profile: Path) -> str:
    assert CHROMIUM is not None
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-extensions", "--hide-scrollbars", "--force-device-scale-factor=1",
           f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, f"chromium failed ({done.returncode}): {done.stderr[-2000:]}"
    return done.stdout


def _probe(base: str, profile: Path) -> dict:
    dom = _chromium("--dump-dom", f"{base}/probe.html", profile=profile)
    match = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.DOTALL)
    assert match and match.group(1) != "pending", f"the probe did not see the report load: {dom[:2000]}"
    return json.loads(html.unescape(match.group(1)))


def _colour_pixels(png: Path, rgb: tuple[int, int, int]) -> int:
    from PIL import Image

    with Image.open(png) as im:
        pixels = np.asarray(im.convert("RGB"))
    return int(np.all(np.abs(pixels.astype(int) - rgb) <= 2, axis=-1).sum())


@needs_chromium
def test_page_in_chromium_certified(subject: Subject, served: tuple[Path, str], tmp_path_factory) -> None:
    out_dir, base = served
    render(certification=_certification(subject), out_dir=out_dir, crossval=_crossval(subject),
           latency_samples_ms=_latency(), soak_series=_soak())
    profile = tmp_path_factory.mktemp("chromium")
    seen = _probe(base, profile)
    assert seen["verdict"].strip() == "CERTIFIED"
    assert seen["checks"] == 5 and seen["matrix"] == 2
    imgs = {i["id"]: i for i in seen["imgs"]}
    assert set(imgs) == {"chart-latency", "chart-soak"}
    for img in imgs.values():  # naturalWidth > 0: the PNG was fetched and decoded
        assert img["complete"] and img["w"] == 900 and img["h"] > 200, img
    assert "digits-cnn v7 (intel-cpu)" in seen["text"] and "ab" * 32 in seen["text"]
    assert HOSTILE in seen["text"]  # escaped in the source, shown verbatim
    assert "not measured" not in seen["text"]

    shot = tmp_path_factory.mktemp("shot") / "page.png"
    _chromium(f"--screenshot={shot}", "--window-size=1280,2400", f"{base}/report/certification.html",
              profile=profile)
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1280, 2400)
        assert len(im.convert("L").getcolors(maxcolors=1 << 16) or ()) > 20  # not a blank page
    assert _colour_pixels(shot, (0xDA, 0xFB, 0xE1)) > 10_000  # the green CERTIFIED banner
    assert _colour_pixels(shot, (0x8C, 0x95, 0x9F)) > 5_000  # the histogram's bars: the chart painted


@needs_chromium
def test_page_in_chromium_not_certified(subject: Subject, served: tuple[Path, str], tmp_path_factory) -> None:
    out_dir, base = served
    render(certification=_certification(subject, accuracy_fails=True), out_dir=out_dir,
           latency_samples_ms=_latency(), soak_series=None)
    seen = _probe(base, tmp_path_factory.mktemp("chromium"))
    assert seen["verdict"].startswith("NOT CERTIFIED") and "failed: accuracy" in seen["verdict"]
    assert "data-quality" not in seen["verdict"]
    assert [i["id"] for i in seen["imgs"]] == ["chart-latency"] and seen["imgs"][0]["w"] == 900
    assert "Soak series: not measured" in seen["text"]
    assert seen["matrix"] == 0 and "Cross-validation: not measured" in seen["text"]
