"""The nightly decisions (edgeopt.nightly): what counts as a change, and when a challenger wins."""

from __future__ import annotations

import math
from pathlib import Path

from edgeopt.hardware import fingerprint
from edgeopt.intervals import Interval
from edgeopt.nightly import Duel, change_digest


def _duel(low: float, point: float = 1.3, high: float = 1.6, *, acc=(0.95, 0.95), floor: float = 0.0) -> Duel:
    return Duel(speedup=Interval(point, low, high, 0.95, 3), rounds=3, champion_p50_ms=1.3, challenger_p50_ms=1.0,
                champion_accuracy=acc[0], challenger_accuracy=acc[1], min_improvement=floor,
                accuracy_ratio_min=0.95)


def test_the_challenger_wins_only_when_its_lower_bound_clears_one() -> None:
    assert _duel(1.05).promote
    assert not _duel(0.98).promote and "not faster by more than the noise" in _duel(0.98).reason()
    assert not _duel(1.05, floor=0.1).promote, "min_improvement raises the bar"
    assert not Duel(speedup=Interval.nan(), rounds=0, champion_p50_ms=1.0, challenger_p50_ms=math.nan,
                    champion_accuracy=None, challenger_accuracy=None, min_improvement=0.0,
                    accuracy_ratio_min=0.95).promote, "an impossible measurement never promotes"


def test_a_faster_challenger_that_lost_accuracy_does_not_win() -> None:
    worse = _duel(1.2, acc=(0.99, 0.90))
    assert worse.faster and not worse.promote and "below 0.95 × the champion's" in worse.reason()
    assert _duel(1.2, acc=(0.99, 0.95)).promote  # 0.95 >= 0.95 × 0.99
    assert not _duel(1.2, acc=(0.99, math.nan)).promote


def test_the_change_digest_follows_content_not_names(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "c.onnx"
    a.write_bytes(b"model-bytes")
    b.write_bytes(b"model-bytes")
    c.write_bytes(b"model-bytes!")
    hw = fingerprint()
    kw = {"calibration": None, "evaluation": None, "profile_doc": {"name": "p"}, "candidates": None, "hardware": hw}
    assert change_digest(model=str(a), **kw) == change_digest(model=str(b), **kw)
    assert change_digest(model=str(a), **kw) != change_digest(model=str(c), **kw)
    assert change_digest(model=str(a), **kw) != change_digest(model=str(a), **{**kw, "profile_doc": {"name": "q"}})
    assert change_digest(model=str(a), **kw) != change_digest(model=str(a), **{**kw, "candidates": ["x"]})
    changed_tools = hw.model_copy(update={"tool_versions": {**hw.tool_versions, "onnxruntime": "0.0"}})
    assert change_digest(model=str(a), **kw) != change_digest(model=str(a), **{**kw, "hardware": changed_tools})
