"""Cross-validation: one artifact on every runtime × device of this host that can load it.

``cross_validate`` lists the runtimes that load the artifact (``runtimes_for``: an ONNX file on ONNX
Runtime, each available execution provider, and on OpenVINO, each device; an OpenVINO IR on OpenVINO's
devices only; runtimes that are not installed or do not read the format are reported in the summary),
then, every job in a fresh process (``edgeopt.bench``):

1. **Outputs.** The FP32 baseline (``subject.baseline`` on its own runtime) and every cell run the
   evaluation data once. Each cell is compared with the baseline (mean cosine, top-1 agreement, largest
   absolute error of the first output) and with every other cell (``agreement``: mean cosine). A cell
   whose mean cosine with the baseline is below ``cosine_min`` is ``unfaithful``. A cell that does not
   load or run is ``failed`` with the harness's one-line reason.
2. **Speed.** ``rounds`` interleaved rounds (round r: baseline, cells...; odd rounds in reverse order),
   one fresh process per measurement. Per cell: its p50 with an interval over the rounds, and its
   speed-up against the baseline (``edgeopt.intervals.ratio_interval``: paired by round, Student's t over
   the rounds' ratios, never narrower than the host's run-to-run spread ``run_to_run_sd``: two fresh
   processes of one and the same model differ by that much, see ``edgeopt.reproducibility``). Like for like: every cell and the baseline run with the same intra-op thread
   budget (``threads``) and the artifact's sequence-shape choice.
3. **Reproducibility**, on the artifact's own runtime and device (its backend and the device or execution
   provider it was built for). The rule:

   * the recorded speed-up is reproduced when the fresh speed-up interval and the recorded one
     (``speedup_ci_low`` .. ``speedup_ci_high``; the point ``speedup_p50`` alone when no interval was
     recorded) **overlap**: both are intervals over interleaved rounds, so the question is "could both
     be the same ratio". This is a lenient test by design (two 95% intervals can overlap while the
     values differ at 95%), and few rounds make the fresh interval wide: a claim is rejected only when
     the measurements clearly contradict it;
   * absolute p50s are compared only when ``recorded_hardware`` is given and has the same CPU model and
     ISA flags as ``hardware``: the recorded ``latency_ms_p50`` must then lie within the fresh p50
     interval widened by ``LATENCY_TOLERANCE`` each way (absolute latencies move with the machine's load
     far more than ratios do). Otherwise the summary says that only the ratio was compared;
   * nothing recorded (no ``speedup_p50``), or no fresh speed-up on the own runtime (it failed):
     ``reproducible`` is None and the summary says why.

   A recorded figure that is not reproduced makes the own cell ``not-reproducible`` (unless it is already
   ``failed`` or ``unfaithful``).
4. **Verdict.** ``fail`` when the artifact's own cell failed or is unfaithful; ``not-reproducible`` when
   the recorded figures were not reproduced; else ``pass``. Other cells failing (e.g. OpenVINO cannot
   load an ONNX Runtime-specific contrib op) or being unfaithful are information for the operator and
   do not change the verdict.

A failing baseline (it does not load, run or measure) raises ``CandidateFailed``: without it nothing
can be compared.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from edgeopt import backends, bench
from edgeopt.bench.shapes import SEQUENCE_KEY
from edgeopt.certify.records import CrossValidation, MatrixCell, Subject
from edgeopt.errors import BackendUnavailable, CandidateFailed
from edgeopt.evaluate.fidelity import cosine_per_sample, load_outputs, predictions
from edgeopt.intervals import ratio_interval
from edgeopt.records import Artifact, HardwareFingerprint

__all__ = ["LATENCY_TOLERANCE", "RuntimeChoice", "cross_validate", "matrix_rows", "own_device", "runtimes_for",
           "skipped_runtimes", "write"]

log = logging.getLogger(__name__)

#: absolute p50s (same hardware only): the recorded p50 may lie this far (relative) outside the fresh interval
LATENCY_TOLERANCE = 0.5

#: (backend name, device, runtime options for ``Backend.load``)
RuntimeChoice = tuple[str, str, dict[str, Any]]

_IR_BACKENDS = ("openvino", "optimum-intel")
_OV_DEVICES = ("CPU", "GPU", "NPU")  # the devices OpenVinoRecipe accepts (AUTO is OpenVINO's own choice)


# --------------------------------------------------------------------------- which runtimes load it
def _format(artifact: Artifact) -> str:
    path = Path(artifact.path)
    if path.suffix == ".onnx":
        return "onnx"
    if path.suffix == ".xml" or (path / "model.xml").is_file():
        return "ir"
    return "other"


def _threads(artifact: Artifact, threads: int | None) -> int:
    """The thread budget: the artifact's own intra-op threads (what its recorded figures used), else
    ``threads`` (the profile's), else 1."""
    return int(artifact.runtime.get("intra_op_threads") or threads or 1)


def own_device(artifact: Artifact) -> str:
    """The device (ONNX Runtime: the execution provider) the artifact was built to run on."""
    if artifact.backend == "onnxruntime":
        return str(artifact.runtime.get("execution_provider") or "cpu").upper()
    return str(artifact.runtime.get("device") or "CPU")


def _survey(artifact: Artifact, threads: int | None) -> tuple[list[RuntimeChoice], list[str]]:
    fmt, t = _format(artifact), _threads(artifact, threads)
    seq = {SEQUENCE_KEY: artifact.runtime[SEQUENCE_KEY]} if artifact.runtime.get(SEQUENCE_KEY) else {}
    choices: list[RuntimeChoice] = []
    skipped: list[str] = []
    own = (artifact.backend, own_device(artifact))
    ort, ov = backends.get("onnxruntime"), backends.get("openvino")
    if fmt != "onnx":
        what = "an OpenVINO IR" if fmt == "ir" else "not one"
        skipped.append(f"onnxruntime: loads ONNX files, this artifact is {what}")
    elif not ort.available():
        skipped.append(f"onnxruntime: not installed (pip install 'edgeopt[{ort.extra}]')")
    else:
        import onnxruntime

        from edgeopt.backends.onnxruntime import PROVIDERS, OrtRecipe

        present = set(onnxruntime.get_available_providers())
        mine = artifact.backend == "onnxruntime"
        base = dict(artifact.runtime) if mine else OrtRecipe().runtime_options() | seq
        keys = [k for k, p in PROVIDERS.items() if p in present or (mine and k.upper() == own[1])]
        for key in sorted(keys, key=lambda k: k != "cpu"):
            runtime = base | {"execution_provider": key}
            runtime["intra_op_threads"] = t if not mine else (runtime.get("intra_op_threads") or t)
            if runtime.get("execution_mode") == "parallel" and not runtime.get("inter_op_threads"):
                runtime["inter_op_threads"] = t
            choices.append(("onnxruntime", key.upper(), runtime))
    if fmt == "other":
        skipped.append("openvino: reads ONNX files and OpenVINO IR, this artifact is neither")
    elif not ov.available():
        skipped.append(f"openvino: not installed (pip install 'edgeopt[{ov.extra}]')")
    else:
        import openvino

        from edgeopt.backends.openvino import OpenVinoRecipe

        found = {d.split(".")[0] for d in openvino.Core().available_devices}
        backend = artifact.backend if fmt == "ir" and artifact.backend in _IR_BACKENDS else "openvino"
        mine = backend == artifact.backend
        devices = [d for d in _OV_DEVICES if d in found or (mine and d == own[1])]
        if mine and own[1] not in devices:
            devices.append(own[1])  # AUTO
        for device in devices:
            if mine and device == own[1]:
                runtime = dict(artifact.runtime)  # as it was built and gated
                runtime["intra_op_threads"] = runtime.get("intra_op_threads") or t
            elif fmt == "ir" and mine:
                runtime = {k: v for k, v in artifact.runtime.items() if k != "compiled"} | {"device": device}
                runtime["intra_op_threads"] = runtime.get("intra_op_threads") or t
            else:
                runtime = OpenVinoRecipe(device=device, intra_op_threads=t).runtime_options() | seq
            choices.append((backend, device, runtime))
    if own not in {(b, d) for b, d, _ in choices}:  # a backend this module does not know: its own runtime only
        runtime = dict(artifact.runtime)
        runtime["intra_op_threads"] = runtime.get("intra_op_threads") or t
        choices.insert(0, (own[0], own[1], runtime))
    return choices, skipped


def runtimes_for(*, artifact: Artifact, threads: int | None = None) -> list[RuntimeChoice]:
    """Every (backend, device, runtime options) on this host that can load ``artifact``.

    On its own backend and device the artifact keeps its own runtime options; elsewhere the runtime's
    defaults. Every choice runs with the artifact's intra-op threads, or ``threads`` (the profile's) when
    the artifact leaves them open, else 1; the artifact's sequence-shape choice goes with it everywhere.
    """
    return _survey(artifact, threads)[0]


def skipped_runtimes(*, artifact: Artifact) -> list[str]:
    """The runtimes left out for ``artifact``, one line each with the reason (not installed, format)."""
    return _survey(artifact, None)[1]


def _label(backend: str, device: str) -> str:
    return f"{backend}/{device}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def _variant(artifact: Artifact, choice: RuntimeChoice) -> Artifact:
    backend, device, runtime = choice
    return artifact.model_copy(update={"backend": backend, "runtime": runtime,
                                       "candidate": f"{artifact.candidate}@{_label(backend, device)}"})


def _baseline(subject: Subject, threads: int) -> Artifact:
    """The baseline with the same thread budget and sequence choice as the cells (like for like)."""
    runtime = dict(subject.baseline.runtime) | {"intra_op_threads": threads}
    runtime.pop(SEQUENCE_KEY, None)
    if subject.artifact.runtime.get(SEQUENCE_KEY):
        runtime[SEQUENCE_KEY] = subject.artifact.runtime[SEQUENCE_KEY]
    return subject.baseline.model_copy(update={"runtime": runtime})


# ------------------------------------------------------------------------------------- the matrix
def cross_validate(*, subject: Subject, evaluation_path: str | None, out_dir: Path, hardware: HardwareFingerprint,
                   settings: bench.BenchSettings, rounds: int = 3, confidence: float = 0.95, cosine_min: float = 0.99,
                   threads: int | None = None, recorded_hardware: HardwareFingerprint | None = None,
                   lock_path: Path | None = None, run_to_run_sd: float = 0.0,
                   progress: Callable[[str], None] = lambda msg: None) -> CrossValidation:
    """Run ``subject.artifact`` on every runtime × device of this host; see the module docstring.

    ``threads``: the profile's intra-op thread budget, used when the artifact leaves its own open; every
    cell and the baseline run with the same count (like for like). ``recorded_hardware``: the machine the recorded figures came from (absolute
    p50s are compared only on the same CPU model and ISA). ``lock_path``: one benchmark at a time per
    machine (``edgeopt.bench.measure``). ``run_to_run_sd``: the host's run-to-run standard deviation of a
    log speed-up (``edgeopt.workflow.host_spread``), the floor under every speed-up interval. Files go
    under ``out_dir`` (``outputs/``, ``bench/``).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    out_dir = Path(out_dir)
    t = _threads(subject.artifact, threads)
    choices, skipped = _survey(subject.artifact, t)
    own = (subject.artifact.backend, own_device(subject.artifact))
    base = _baseline(subject, t)
    variants = {_label(b, d): _variant(subject.artifact, (b, d, r)) for b, d, r in choices}
    failures: dict[str, str] = {}

    def infer(artifact: Artifact, name: str) -> np.ndarray:
        progress(f"outputs {name}")
        path = bench.infer(artifact=artifact, signature=subject.signature, out_path=out_dir / "outputs" /
                           f"{_slug(name)}.npz", data_path=evaluation_path, batch_size=settings.batch_size,
                           timeout_s=settings.timeout_s)
        return load_outputs(path)

    base_out = infer(base, "baseline")
    outputs: dict[str, np.ndarray] = {}
    for name, variant in variants.items():
        try:
            outputs[name] = infer(variant, name)
            if outputs[name].shape != base_out.shape:
                raise CandidateFailed("accuracy", f"{variant.candidate}: output shape {outputs[name].shape} "
                                      f"differs from the baseline's {base_out.shape}")
        except (CandidateFailed, BackendUnavailable) as exc:
            failures[name] = _one_line(exc)
            outputs.pop(name, None)
            log.warning("cross-validation: %s failed: %s", name, failures[name])

    measured = {"baseline": base} | {n: v for n, v in variants.items() if n not in failures}
    samples, lost = bench.interleaved_rounds(artifacts=measured, reference="baseline", rounds=rounds,
                                             settings=settings, signature=subject.signature, hardware=hardware,
                                             out_dir=out_dir / "bench", data_path=evaluation_path,
                                             lock_path=lock_path, what="cross-validation", progress=progress)
    failures |= lost

    cells = []
    for (backend, device, _), name in zip(choices, variants, strict=True):
        is_own = (backend, device) == own
        placement = subject.artifact.placement.get("target_share") if is_own else None
        cells.append(_cell(backend, device, outputs.get(name), base_out, samples["baseline"],
                           samples.get(name, []), failures.get(name), cosine_min=cosine_min, confidence=confidence,
                           placement=placement, floor_sd=run_to_run_sd))
    agreement = {f"{a}~{b}": float(np.mean(cosine_per_sample(outputs[a], outputs[b])))
                 for a, b in combinations([n for n in variants if n in outputs], 2)}
    own_cell = next(c for c in cells if (c.runtime, c.device) == own)
    reproducible, notes = _reproduce(own_cell, subject.recorded, hardware=hardware,
                                     recorded_hardware=recorded_hardware)
    if reproducible is False and own_cell.status == "ok":
        i = cells.index(own_cell)
        own_cell = cells[i] = own_cell.model_copy(update={"status": "not-reproducible", "message": "; ".join(notes)})
    if own_cell.status in ("failed", "unfaithful"):
        verdict = "fail"
    elif reproducible is False:
        verdict = "not-reproducible"
    else:
        verdict = "pass"
    summary = _summary(cells, own_cell, verdict, notes, skipped)
    log.info("cross-validation of %s %s: %s", subject.model_name, subject.version, summary)
    return CrossValidation(subject=subject, hardware=hardware, cells=tuple(cells), agreement=agreement,
                           reproducible=reproducible, verdict=verdict, summary=summary)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    reason = getattr(exc, "reason", None)
    return f"{reason}: {text}" if reason else text


def _cell(backend: str, device: str, out: np.ndarray | None, base_out: np.ndarray, base_rounds: list[np.ndarray],
          rounds: list[np.ndarray], failure: str | None, *, cosine_min: float, confidence: float,
          placement: Any, floor_sd: float = 0.0) -> MatrixCell:
    fields: dict[str, Any] = {"runtime": backend, "device": device, "placement_share":
                              float(placement) if isinstance(placement, int | float) else None}
    if out is not None:
        cos = float(np.mean(cosine_per_sample(out, base_out)))
        fields |= {"cosine_vs_baseline": cos,
                   "top1_vs_baseline": float(np.mean(predictions(out) == predictions(base_out))),
                   "max_abs_vs_baseline": float(np.max(np.abs(out.astype(np.float64) - base_out)))}
    if rounds:
        # the p50 with its interval: the ratio of the cell's latency to a constant 1 ms, paired by round
        p50 = ratio_interval(baseline=rounds, candidate=[np.ones(1)] * len(rounds), confidence=confidence)
        speed = ratio_interval(baseline=base_rounds, candidate=rounds, confidence=confidence, floor_sd=floor_sd)
        fields |= {"latency_ms_p50": p50.point, "latency_ms_p50_ci": (p50.low, p50.high),
                   "speedup_p50": speed.point, "speedup_ci": (speed.low, speed.high), "rounds": speed.rounds}
    if failure is not None:
        return MatrixCell(status="failed", message=failure, **fields)
    if fields["cosine_vs_baseline"] < cosine_min:
        return MatrixCell(status="unfaithful", message=f"mean cosine with the FP32 baseline "
                          f"{fields['cosine_vs_baseline']:.5f} < {cosine_min}", **fields)
    return MatrixCell(status="ok", **fields)


def _same_hardware(a: HardwareFingerprint, b: HardwareFingerprint) -> bool:
    return a.cpu_model == b.cpu_model and set(a.isa_flags) == set(b.isa_flags)


def _reproduce(own: MatrixCell, recorded: dict[str, float], *, hardware: HardwareFingerprint,
               recorded_hardware: HardwareFingerprint | None) -> tuple[bool | None, list[str]]:
    """Whether the recorded figures are reproduced on the own cell (rule: module docstring), and why."""
    point = recorded.get("speedup_p50")
    if point is None or not math.isfinite(point):
        return None, ["nothing recorded to reproduce (no speedup_p50)"]
    low, high = own.speedup_ci
    if not (math.isfinite(low) and math.isfinite(high)):
        return None, [f"no fresh speed-up on the artifact's own runtime ({own.status}): reproducibility not checked"]
    r_low, r_high = recorded.get("speedup_ci_low", point), recorded.get("speedup_ci_high", point)
    ok = r_low <= high and low <= r_high
    rec = f"{point:.3g}" + (f" [{r_low:.3g}, {r_high:.3g}]" if (r_low, r_high) != (point, point) else "")
    verdict = "intervals overlap" if ok else "NOT reproduced (no overlap)"
    notes = [f"speed-up {own.speedup_p50:.3g} [{low:.3g}, {high:.3g}] vs recorded {rec}: {verdict}"]
    if recorded_hardware is None or not _same_hardware(hardware, recorded_hardware):
        where = "unknown hardware" if recorded_hardware is None else recorded_hardware.cpu_model
        notes.append(f"recorded on {where}, measured on {hardware.cpu_model}: only the ratio is compared")
    elif "latency_ms_p50" in recorded:
        rec_p50 = recorded["latency_ms_p50"]
        p_low, p_high = own.latency_ms_p50_ci
        near = p_low / (1 + LATENCY_TOLERANCE) <= rec_p50 <= p_high * (1 + LATENCY_TOLERANCE)
        ok = ok and near
        notes.append(f"p50 {own.latency_ms_p50:.4g} ms [{p_low:.4g}, {p_high:.4g}] vs recorded {rec_p50:.4g} ms "
                     f"(same hardware, ±{LATENCY_TOLERANCE:.0%}): {'consistent' if near else 'NOT reproduced'}")
    return ok, notes


def _summary(cells: list[MatrixCell], own: MatrixCell, verdict: str, notes: list[str], skipped: list[str]) -> str:
    ok = sum(c.status == "ok" for c in cells)
    parts = [f"{verdict}: own runtime {_label(own.runtime, own.device)} {own.status}",
             f"{ok}/{len(cells)} runtime × device cells ok", *notes]
    others = [f"{_label(c.runtime, c.device)} {c.status}" for c in cells if c is not own and c.status != "ok"]
    if others:
        parts.append("other runtimes (information only): " + ", ".join(others))
    if skipped:
        parts.append("skipped: " + "; ".join(skipped))
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------- output
def _fmt(value: float, spec: str = ".4g") -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def _with_ci(value: float, ci: tuple[float, float], spec: str) -> str:
    if not math.isfinite(value):
        return "n/a"
    return f"{value:{spec}} [{_fmt(ci[0], spec)}, {_fmt(ci[1], spec)}]"


def matrix_rows(cv: CrossValidation) -> list[dict[str, str]]:
    """One row per cell, formatted for a table (a Prefect table artifact, the CLI)."""
    return [{"runtime": c.runtime, "device": c.device, "status": c.status,
             "p50 ms [CI]": _with_ci(c.latency_ms_p50, c.latency_ms_p50_ci, ".4g"),
             "speed-up [CI]": _with_ci(c.speedup_p50, c.speedup_ci, ".3g"),
             "cosine": _fmt(c.cosine_vs_baseline, ".5f"), "top-1": _fmt(c.top1_vs_baseline, ".3f"),
             "max abs": _fmt(c.max_abs_vs_baseline, ".3g"),
             "placement": "n/a" if c.placement_share is None else f"{c.placement_share:.0%}",
             "note": c.message} for c in cv.cells]


def write(cv: CrossValidation, *, out_dir: Path) -> Path:
    """Write ``matrix.json`` (the whole record; figures that could not be measured are ``null``)."""
    path = Path(out_dir) / "matrix.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(cv.model_dump_json(indent=2), encoding="utf-8")
    return path
