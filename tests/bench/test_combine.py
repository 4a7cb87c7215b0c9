"""Pooling repeated measurements of one artifact."""

from __future__ import annotations

import numpy as np
import pytest

from edgeopt.bench import combine
from edgeopt.hardware import fingerprint
from edgeopt.records import BenchmarkResult


def _result(tmp_path, name: str, samples: np.ndarray, *, rss: float, cand: str = "c", steady: float | None = None,
            ratio: float | None = 1.0) -> BenchmarkResult:
    path = tmp_path / f"{name}.npy"
    np.save(path, samples)
    p50 = float(np.percentile(samples, 50))
    return BenchmarkResult(
        candidate=cand, samples=samples.size, batch_size=1, latency_ms_p50=p50, latency_ms_p90=p50,
        latency_ms_p95=p50, latency_ms_p99=p50, latency_ms_mean=float(samples.mean()), latency_ms_std=0.0,
        latency_ms_min=float(samples.min()), latency_ms_max=float(samples.max()), throughput_per_s=1.0,
        rss_peak_mb=rss, rss_steady_mb=rss / 2 if steady is None else steady, rss_peak_model_mb=rss - 10,
        memory_source=f"source-{name}", load_time_ms=10.0, size_bytes=100, duration_s=1.0, samples_path=str(path),
        audit_path=f"{name}/audit.npz", audit_repeat_ratio=ratio, hardware=fingerprint())


def test_pools_samples_and_reports_spread(tmp_path):
    a = _result(tmp_path, "a", np.full(100, 1.0), rss=50)
    b = _result(tmp_path, "b", np.full(300, 1.2), rss=70)
    c = combine([a, b], out_path=tmp_path / "pooled.npy")
    assert c.samples == 400 and c.repeats == 2
    assert c.latency_ms_p50 == pytest.approx(1.2)  # 300 of 400 samples are 1.2
    assert c.latency_ms_min == 1.0 and c.latency_ms_max == 1.2
    assert c.latency_ms_p50_repeats == (1.0, 1.2)
    assert c.latency_p50_spread_pct == pytest.approx(100 * 0.2 / 1.1)
    assert c.rss_peak_mb == 70 and c.rss_peak_model_mb == 60
    assert c.rss_steady_mb == 30 and c.rss_steady_mb_repeats == (25, 35)
    assert c.repeat_sample_counts == (100, 300)
    assert c.audit_path == "a/audit.npz" and c.memory_source == "source-a"
    assert np.load(c.samples_path).size == 400


def test_memory_and_audit_pooling(tmp_path):
    rs = [_result(tmp_path, "a", np.ones(10), rss=100, steady=-3.0, ratio=0.9),
          _result(tmp_path, "b", np.ones(20), rss=120, steady=40.0, ratio=None),
          _result(tmp_path, "c", np.ones(30), rss=90, steady=41.0, ratio=0.7)]
    c = combine(rs, out_path=tmp_path / "p.npy")
    assert c.rss_steady_mb == 40.0 and c.rss_steady_mb_repeats == (-3.0, 40.0, 41.0)  # median, nothing clamped
    assert c.rss_peak_mb == 120 and c.rss_peak_model_mb == 110
    assert c.audit_repeat_ratio == 0.7  # the smallest over the repeats that measured it
    assert c.repeat_sample_counts == (10, 20, 30) and c.samples == 60


def test_single_result_passes_through(tmp_path):
    a = _result(tmp_path, "a", np.linspace(1, 2, 50), rss=50)
    c = combine([a], out_path=tmp_path / "p.npy")
    assert c.repeats == 1 and c.latency_p50_spread_pct == 0.0 and c.latency_ms_p50 == a.latency_ms_p50
    assert c.rss_steady_mb_repeats == (25,) and c.repeat_sample_counts == (50,)


def test_refuses_mixed_candidates(tmp_path):
    with pytest.raises(ValueError, match="different candidates"):
        combine([_result(tmp_path, "a", np.ones(5), rss=1), _result(tmp_path, "b", np.ones(5), rss=1, cand="d")],
                out_path=tmp_path / "p.npy")
