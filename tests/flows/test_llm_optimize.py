"""``edgeopt optimize`` on a language model, run as a user runs it (the command in a subprocess, its own data
folder, Prefect's embedded API, a real MLflow store, real llama.cpp builds and measurements): the briefly
trained tiny Llama (tests/conftest.py ``tiny_llama``), the F16 GGUF reference and two llama.cpp candidates.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from tests.conftest import write_profile
from tests.test_cli import run

pytest.importorskip("llama_cpp")
pytestmark = [pytest.mark.flow]

CANDIDATES = [{"name": n, "backend": "llamacpp", "kinds": ["llm"], "recipe": {"quant": q}}
              for n, q in (("llamacpp-q8_0", "Q8_0"), ("llamacpp-q4_0", "Q4_0"),
                           ("llamacpp-q4_k_m-imatrix", "Q4_K_M"))]
CANDIDATES[2]["recipe"]["imatrix"] = True
#: OpenVINO GenAI's INT8 weight compression, measured against the same llama.cpp F16 reference
OV_INT8 = {"name": "ov-genai-int8", "backend": "openvino-genai", "kinds": ["llm"], "recipe": {"weights": "int8"}}
has_ov_genai = importlib.util.find_spec("openvino_genai") is not None
#: ONNX Runtime GenAI's int4 (MatMulNBits, blocks of 256, int8 activations): intel-cpu's recipe, same reference
ORT_INT4 = {"name": "ort-genai-int4", "backend": "onnxruntime-genai", "kinds": ["llm"],
            "recipe": {"weights": "int4", "block_size": 256, "accuracy_level": 4}}
has_ort_genai = importlib.util.find_spec("onnxruntime_genai") is not None
#: short measurements: 2 interleaved rounds of 2 runs of 32 generated tokens; 4 windows of 64 tokens scored
FAST = {"repeats": 2, "llm": {"prompt_tokens": 32, "gen_tokens": 32, "runs": 2, "eval_window": 64,
                              "eval_max_windows": 4}}


def _env(home: Path) -> dict[str, str]:
    env = {**os.environ, "EDGEOPT_HOME": str(home), "PREFECT_HOME": str(home / "prefect"), "COLUMNS": "250",
           "NO_COLOR": "1"}
    for key in [k for k in env if k.startswith(("PREFECT_LOGGING", "MLFLOW_LOGGING", "PREFECT_RESULTS_LOCAL",
                                                 "PREFECT_LOCAL_STORAGE"))]:
        env.pop(key)
    return env


def _registered(home: Path) -> list:
    db = home / "mlflow" / "mlflow.db"
    if not db.exists():
        return []
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}").search_registered_models()


def test_llm_optimize_end_to_end(tiny_llama, tmp_path):
    """F16 reference + Q8_0 + Q4_0 (+ OpenVINO GenAI INT8 and ONNX Runtime GenAI int4 where installed) through
    the real flow: the LLM table
    with finite figures, speed-ups that are the ratio of this run's tokens/s, scores in MLflow, verdicts that
    follow the thresholds, and a registered version only for a candidate that passed."""
    home = tmp_path / "home"
    # speed and memory gates out of the way: a 4M-parameter model is dominated by per-token overhead, and two
    # rounds on a shared 2-vCPU machine give speed-up intervals too wide for any fixed threshold to settle
    # every time; the quality gates keep their defaults (perplexity within 5%, mean KLD <= 0.01)
    profile = write_profile(tmp_path / "llm.yaml", candidates=[*CANDIDATES, OV_INT8, ORT_INT4], benchmark=FAST,
                            gates={"speedup_min": 0.0, "memory_reduction_min": -1.0})
    report_path = tmp_path / "report.json"
    names = ["llamacpp-f16", "llamacpp-q8_0", "llamacpp-q4_0", *(["ov-genai-int8"] if has_ov_genai else []),
             *(["ort-genai-int4"] if has_ort_genai else [])]
    r = run(_env(home), "optimize", tiny_llama["hf"], "--profile", profile,
            *[a for n in names[1:] for a in ("-c", n)], "--eval", tiny_llama["eval"], "--json", report_path)
    assert r.returncode == 0, r.stdout + r.stderr
    for column in ("gen tok/s", "prompt tok/s", "TTFT ms", "speed-up", "peak RSS MB", "size MB", "perplexity",
                   "KLD vs F16", "top-1 agree", "verdict"):
        assert column in r.stdout, r.stdout
    assert "llama_model_quantize" not in r.stdout + r.stderr, "llama.cpp's log goes to the build log"
    doc = json.loads(report_path.read_text())
    outcomes = {o["spec"]["name"]: o for o in doc["outcomes"]}
    assert list(outcomes) == names
    ref = outcomes["llamacpp-f16"]
    for name, o in outcomes.items():
        assert o["failure"] is None, o["failure"]
        g, e = o["generation"], o["llm_eval"]
        # like for like: the same prompt length, generated tokens and threads for every row
        assert (g["prompt_tokens"], g["gen_tokens"], g["threads"]) == (32, 32, 1)
        assert len(g["gen_tps_rounds"]) == 2 * 2, "2 interleaved rounds of 2 runs each, all kept"
        for key in ("gen_tps", "prompt_tps", "ttft_ms", "rss_peak_mb"):
            assert math.isfinite(g[key]) and g[key] > 0, (name, key, g[key])
        assert math.isfinite(e["perplexity"]) and e["perplexity"] > 1
        assert e["tokens"] == 4 * 64
        if o["artifact"]["backend"] == "llamacpp":  # llama.cpp reports the KV cache it allocated (F16 here)
            assert g["kv_context_tokens"] == 2048
            assert g["kv_cache_mb"] == pytest.approx(g["kv_cache_bytes_per_token"] * 2048 / 2**20, rel=1e-9)
            assert g["bytes_per_token"] > g["size_bytes"] / 4, "the weights read per token (the bandwidth bound's)"
        # the pooled runs are exactly the rounds recorded on disk by this run's measurements
        recorded = [json.loads(f.read_text())["gen_tps_rounds"]
                    for f in sorted((home / "work" / "generate").glob(f"{name}-*/generation.json"))]
        assert len(recorded) == 2
        assert sorted(v for r in recorded for v in r) == sorted(g["gen_tps_rounds"])
        if name == "llamacpp-f16":
            continue
        # the speed-up is this run's ratio: medians of the per-run tokens/s of both sides
        expected = np.median(g["gen_tps_rounds"]) / np.median(ref["generation"]["gen_tps_rounds"])
        assert o["speedup_p50"] == pytest.approx(expected, rel=1e-9)
        speed = next(v for v in o["verdicts"] if v["gate"] == "speedup")
        assert speed["ci_low"] <= speed["measured"] <= speed["ci_high"]
        # verdicts follow the thresholds (quality gates: point values, no interval)
        for v in o["verdicts"]:
            if v["ci_low"] is None:
                ok = v["measured"] <= v["threshold"] if v["comparator"] == "<=" else v["measured"] >= v["threshold"]
                assert v["passed"] == ok, v
            else:
                bound = v["ci_low"] if v["comparator"] == ">=" else v["ci_high"]
                assert v["passed"] == (bound >= v["threshold"] if v["comparator"] == ">=" else bound <= v["threshold"])
        assert {v["gate"] for v in o["verdicts"]} == {"perplexity", "kld", "speedup", "memory"}
    # Q8_0 keeps the F16 model's distributions (mean KLD far below the 0.01 gate on any CPU): a broken
    # evaluation (wrong reference, misaligned positions) would not
    assert outcomes["llamacpp-q8_0"]["llm_eval"]["kld_mean"] < 0.002
    assert outcomes["llamacpp-q8_0"]["llm_eval"]["top1_agreement"] > 0.9
    if has_ov_genai:  # another runtime's INT8 weights: the same distributions as llama.cpp's F16 within the gate
        assert outcomes["ov-genai-int8"]["llm_eval"]["kld_mean"] < 0.01
        assert outcomes["ov-genai-int8"]["artifact"]["backend"] == "openvino-genai"
    if has_ort_genai:  # ONNX Runtime's int4 weights: within the KLD gate of llama.cpp's F16 on this checkpoint
        o = outcomes["ort-genai-int4"]
        assert o["artifact"]["backend"] == "onnxruntime-genai" and o["llm_eval"]["kld_mean"] < 0.01
        assert any("MatMulNBits read back" in n and "block sizes {256:" in n for n in o["artifact"]["notes"])
        cfg = json.loads((Path(tiny_llama["hf"]) / "config.json").read_text())
        # its float32 KV cache: 2 × layers × KV heads × head size × 4 bytes, at the profile's context length
        kv = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * 4
        assert o["generation"]["kv_cache_bytes_per_token"] == kv and o["generation"]["kv_context_tokens"] == 2048
        assert 0 < o["generation"]["bytes_per_token"] < o["generation"]["size_bytes"]  # but the float embedding

    cl = mlflow.MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow' / 'mlflow.db'}")
    children = {run_.info.run_name: run_ for run_ in cl.search_runs(
        [doc["experiment_id"]], f"tags.mlflow.parentRunId = '{doc['mlflow_run_id']}'")}
    assert set(children) == set(outcomes)
    for name, o in outcomes.items():
        m = children[name].data.metrics
        assert m["gen_tps"] == pytest.approx(o["generation"]["gen_tps"])
        assert m["perplexity"] == pytest.approx(o["llm_eval"]["perplexity"])
        assert m["kld_mean"] == pytest.approx(o["llm_eval"]["kld_mean"])
        assert {"prompt_tps", "ttft_ms", "rss_peak_mb", "size_bytes", "top1_agreement"} <= set(m)
        if o["generation"]["kv_cache_mb"] is not None:
            assert m["kv_cache_mb"] == pytest.approx(o["generation"]["kv_cache_mb"])
    passed = [n for n, o in outcomes.items() if o["verdicts"] and all(v["passed"] for v in o["verdicts"])]
    selected = doc["selection"]["selected"]
    models = _registered(home)
    if selected is None:
        assert models == []
    else:
        assert selected in passed
        version = cl.get_model_version_by_alias(doc["model_name"], "candidate")
        assert version.tags["edgeopt.candidate"] == selected
        assert cl.get_run(doc["mlflow_run_id"]).data.metrics["selected_gen_tps"] > 0
    assert passed, "Q8_0 passes quality gates this loose profile leaves at their defaults"


@pytest.mark.parametrize("case", ["missing-eval", "empty-eval", "no-calibration-for-imatrix", "quantized-gguf"])
def test_llm_bad_input_is_one_line(tiny_llama, tmp_path, case):
    """Bad input: one error line, a non-zero exit, nothing registered."""
    home = tmp_path / "home"
    profile = write_profile(tmp_path / "llm.yaml", candidates=CANDIDATES, benchmark=FAST)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n", encoding="utf-8")
    model = tiny_llama["hf"]
    if case == "quantized-gguf":
        from edgeopt.backends.llamacpp import quantize_gguf

        model = tmp_path / "model-q4_0.gguf"
        quantize_gguf(tiny_llama["f16"], model, "Q4_0")
    args = {"missing-eval": ["-c", "llamacpp-q8_0", "--eval", tmp_path / "nope.txt"],
            "empty-eval": ["-c", "llamacpp-q8_0", "--eval", empty],
            "no-calibration-for-imatrix": ["-c", "llamacpp-q4_k_m-imatrix", "--eval", tiny_llama["eval"]],
            "quantized-gguf": ["-c", "llamacpp-q8_0", "--eval", tiny_llama["eval"]]}[case]
    r = run(_env(home), "optimize", model, "--profile", profile, *args, timeout=120)
    assert r.returncode != 0
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert {"missing-eval": "no such file", "empty-eval": "evaluation data",
            "no-calibration-for-imatrix": "--calibration", "quantized-gguf": "already quantized"}[case] in lines[0]
    assert _registered(home) == []


@pytest.mark.heavy
def test_llm_optimize_from_a_gguf_uses_it_as_the_reference(tiny_llama, tmp_path):
    """A GGUF given on the command line is the F16 reference itself (byte for byte), on a profile of another
    architecture with --allow-hardware-mismatch; the imatrix recipe is left out (it needs the checkpoint)."""
    import hashlib

    home = tmp_path / "home"
    profile = write_profile(tmp_path / "llm.yaml", candidates=CANDIDATES, benchmark=FAST)
    doc = yaml.safe_load(profile.read_text())
    doc["hardware"]["arch"] = "arm64"  # not this machine
    profile.write_text(yaml.safe_dump(doc))
    report_path = tmp_path / "report.json"
    r = run(_env(home), "optimize", tiny_llama["f16"], "--profile", profile, "--allow-hardware-mismatch",
            "--eval", tiny_llama["eval"], "--json", report_path)
    assert r.returncode == 0, r.stdout + r.stderr
    outcomes = {o["spec"]["name"]: o for o in json.loads(report_path.read_text())["outcomes"]}
    assert list(outcomes) == ["llamacpp-f16", "llamacpp-q8_0", "llamacpp-q4_0"]
    assert outcomes["llamacpp-f16"]["artifact"]["sha256"] == hashlib.sha256(tiny_llama["f16"].read_bytes()).hexdigest()
    assert all(o["failure"] is None and o["generation"]["gen_tps"] > 0 for o in outcomes.values())


@pytest.mark.usefixtures("prefect_harness")
def test_a_re_measured_llm_speed_up_is_judged_on_every_run_of_it_on_this_host(tiny_llama, tmp_path):
    """As for every other model: run 2 re-measures the F16 reference and Q8_0 (refresh) and its speed-up
    verdict pools both runs, centred on their geometric mean; the LLM history is kept apart from the latency
    ratios' (its own file), and run 1's fresh figure is its first line."""
    from flows.optimize import optimize_flow

    profile = write_profile(tmp_path / "llm.yaml", candidates=CANDIDATES[:1], benchmark={**FAST, "run_to_run_spread": 0.2},
                            gates={"speedup_min": 0.0, "memory_reduction_min": -1.0})
    verdicts = []
    for refresh in (False, True):
        report = optimize_flow(model=str(tiny_llama["hf"]), profile=str(profile), evaluation=str(tiny_llama["eval"]),
                               data_dir=str(tmp_path / "data"), refresh=refresh)
        q8 = next(o for o in report.outcomes if o.name == "llamacpp-q8_0")
        verdicts.append(next(v for v in q8.verdicts if v.gate == "speedup"))
    first, second = verdicts
    assert first.runs_pooled == 1 and second.runs_pooled == 2
    assert second.pooled_point == pytest.approx(math.sqrt(first.measured * second.measured), rel=1e-9)
    assert second.ci_low < second.pooled_point < second.ci_high
    files = sorted(p.name for p in (tmp_path / "data" / "hosts").glob("*.jsonl"))
    assert len(files) == 1 and files[0].endswith("-llm.jsonl"), files
    lines = [json.loads(ln) for ln in (tmp_path / "data" / "hosts" / files[0]).read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["log_ratio"] == pytest.approx(math.log(first.measured), rel=1e-9)


@pytest.mark.heavy  # ~4 min on 2 vCPUs: the real apple-silicon profile's benchmark settings
def test_apple_silicon_profile_mlx_rows_off_apple_silicon(tiny_llama, tmp_path):
    """``--profile apple-silicon --allow-hardware-mismatch`` on this (non-Apple) host with the two MLX candidates
    (mlx[cpu]): their rows carry real quality figures against the F16 reference and speed figures marked not
    representative, whose speed-up gate fails (never a silent pass): nothing is registered, MLflow says why."""
    pytest.importorskip("mlx_lm")
    from edgeopt.backends.mlx import speed_caveat

    if speed_caveat() is None:
        pytest.skip("on Apple silicon MLX speed is representative; this test is about other hosts")
    home = tmp_path / "home"
    report_path = tmp_path / "report.json"
    r = run(_env(home), "optimize", tiny_llama["hf"], "--profile", "apple-silicon", "--allow-hardware-mismatch",
            "-c", "mlx-int8-g64", "-c", "mlx-int4-g64", "--eval", tiny_llama["eval"], "--json", report_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "not representative" in r.stdout and "(n/r)" in r.stdout, r.stdout
    doc = json.loads(report_path.read_text())
    outcomes = {o["spec"]["name"]: o for o in doc["outcomes"]}
    assert list(outcomes) == ["llamacpp-f16", "mlx-int4-g64", "mlx-int8-g64"]  # the profile's order
    import llama_cpp

    # the reference runs on llama.cpp with the profile's Metal offload: a build without a GPU backend says so
    ref_caveat = outcomes["llamacpp-f16"]["generation"]["not_representative"]
    assert (ref_caveat is None) == bool(llama_cpp.llama_supports_gpu_offload())
    for name in ("mlx-int8-g64", "mlx-int4-g64"):
        o = outcomes[name]
        assert o["failure"] is None and o["artifact"]["backend"] == "mlx"
        assert o["generation"]["not_representative"].startswith("not representative: MLX on ")
        assert o["generation"]["gen_tps"] > 0  # measured and kept, with its caveat
        speed = next(v for v in o["verdicts"] if v["gate"] == "speedup")
        assert speed["status"] == "fail" and not speed["passed"] and speed["metric"].endswith("(not representative)")
        assert o["speedup_p50"] is None or math.isnan(o["speedup_p50"])
        e = o["llm_eval"]
        assert math.isfinite(e["perplexity"]) and math.isfinite(e["kld_mean"]) and e["top1_agreement"] > 0.9
    assert outcomes["mlx-int8-g64"]["llm_eval"]["kld_mean"] < 0.01
    assert doc["selection"]["selected"] is None and _registered(home) == []
    cl = mlflow.MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow' / 'mlflow.db'}")
    children = {run_.info.run_name: run_ for run_ in cl.search_runs(
        [doc["experiment_id"]], f"tags.mlflow.parentRunId = '{doc['mlflow_run_id']}'")}
    for name in ("mlx-int8-g64", "mlx-int4-g64"):
        run_ = children[name]
        assert run_.data.tags["edgeopt.speed.not_representative"].startswith("not representative")
        assert run_.data.metrics["speed_representative"] == 0.0 and "perplexity" in run_.data.metrics
    assert children["llamacpp-f16"].data.metrics["speed_representative"] == (1.0 if ref_caveat is None else 0.0)
