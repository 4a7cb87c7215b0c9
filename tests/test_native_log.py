"""Native runtime logs: diverted from the terminal into a build's log file."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.realworld_models import make_failing_reshape


def test_native_error_lines_go_to_the_log_not_the_terminal(tmp_path):
    model = make_failing_reshape(tmp_path / "m.onnx")
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        import numpy as np
        import onnxruntime as ort
        from edgeopt import native_log

        if sys.argv[1] == "divert":
            native_log.divert()
        with native_log.captured(Path({str(tmp_path / 'build.log')!r}), what="build x"):
            try:
                ort.InferenceSession({str(model)!r}, providers=["CPUExecutionProvider"]).run(
                    None, {{"x": np.ones((1, 4), np.float32)}})
            except Exception as exc:
                print("python saw:", type(exc).__name__, file=sys.stderr)
    """)
    r = subprocess.run([sys.executable, "-c", script, "divert"], capture_output=True, text=True, check=True)
    assert r.stderr.strip() == "python saw: Fail"  # Python's own stderr still reaches the terminal
    log = (tmp_path / "build.log").read_text()
    assert "# build x: native runtime log" in log and "[E:onnxruntime:" in log and "Reshape" in log

    # not diverted (--verbose, or edgeopt as a library): the native line stays on the terminal
    r = subprocess.run([sys.executable, "-c", script, "keep"], capture_output=True, text=True, check=True)
    assert "[E:onnxruntime:" in r.stderr and "python saw: Fail" in r.stderr
    assert "not captured" in (tmp_path / "build.log").read_text()
