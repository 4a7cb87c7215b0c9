"""The measuring process: ``python -m edgeopt.bench.worker JOB.json`` (started by ``harness``).

It runs in a fresh interpreter so a crash, a leak or an OOM costs only this candidate. It reads a
job file written by the parent, does one job (``measure`` or ``infer``), and writes a result JSON
(``job["result_path"]``): ``{"ok": true, ...}`` or ``{"ok": false, "reason"|"error", "message"}``.
Its only output besides that file and the files it was asked for is logging on stderr.

Memory (``edgeopt.bench.memory``): the reference point is taken once the runtime is imported, its own
libraries, thread pools and kernels are loaded and warmed by loading and running a tiny model with the
same runtime options (``Backend.warm``, then released), and the inputs are built; garbage is collected
and the allocator trimmed (``malloc_trim``) first. ``rss_steady_mb`` is the anonymous RSS (``RssAnon``)
after the timed runs (collected and trimmed again) minus the reference's, plus the pages of model files
mapped since the reference that the timed runs touched: what the loaded, warmed-up model keeps. ``rss_steady_file_mb`` is the same for file-backed RSS (memory-mapped weights).
``rss_peak_model_mb`` is the peak RSS from the reference on (``VmHWM`` reset there through
``/proc/self/clear_refs``) minus the RSS there: load and inference transients included.
``rss_peak_mb`` is the whole process's peak. Nothing is clamped; NaN where not measurable (other OSes:
USS for the steady figure, no resettable peak). The payload also carries ``rss_model_mb_v1``, the
figure of schema 2 (peak minus RSS after the data, load-time transients and the runtime's plugins
included), for comparison in benchmark scripts only.

Audit (as MLPerf's TEST01 / TEST04): the outputs of the first pass over up to ``AUDIT_CAPTURE`` full
batches of the timed loop are kept (references, no copy inside the loop), padded back to the full
sequence length as ``infer`` does, and written to ``audit.npz`` (``index`` = the data rows, then
``output_<k>``), for ``edgeopt.bench.audit.check_outputs`` to compare with the evaluation run's. After
the timed loop each of the first ``AUDIT_FEEDS`` distinct inputs runs ``AUDIT_REPEATS`` times back to
back (the first discarded), within ``AUDIT_BUDGET`` of the timed loop's duration: ``audit_repeat_ratio``
is the median over those inputs of (median latency repeated / median latency of the same input right
after a same-shaped other input, measured interleaved with the repeats; see
``edgeopt.bench.audit.repeat_ratio``). A runtime that caches results runs
repeated identical inputs far faster. Synthetic inputs (no data file) are made in blocks
(``SYNTHETIC_BLOCK``) so that ``measure`` and ``infer`` see the same rows whatever their sample counts.

Fault injection (tests only, ``edgeopt.bench.faults``): ``EDGEOPT_BENCH_FAULT`` makes the worker
misbehave right after loading the artifact (crash, hang, oom, NaN outputs, cached results, outputs that
drift in the timed loop), to test the parent's failure classification and the audit.
"""

from __future__ import annotations

import faulthandler
import gc
import hashlib
import importlib
import json
import logging
import math
import os
import sys
import time
from array import array
from pathlib import Path
from typing import Any

import numpy as np

from edgeopt.bench import audit, faults, memory
from edgeopt.bench.faults import FAULT_ENV, FAULTS
from edgeopt.bench.shapes import pad_outputs, split_runtime, trim
from edgeopt.data import Dataset, load_dataset, synthetic_dataset
from edgeopt.errors import BackendUnavailable, CandidateFailed, ConfigError, DataError, ModelError
from edgeopt.records import Artifact, TensorSpec

__all__ = ["AUDIT_BUDGET", "AUDIT_CAPTURE", "AUDIT_FEEDS", "AUDIT_REPEATS", "FAULTS", "FAULT_ENV", "SYNTHETIC_BLOCK",
           "main"]

log = logging.getLogger(__name__)

#: audit: timed-loop batches whose outputs are kept (the first pass over the distinct full batches)
AUDIT_CAPTURE = 16
#: audit: distinct inputs run repeatedly after the timed loop, and how many times each (first discarded)
AUDIT_FEEDS = 8
AUDIT_REPEATS = 6
#: audit: repeated runs stop starting new inputs after this share of the timed loop's duration
AUDIT_BUDGET = 0.25
#: synthetic inputs are made in blocks of this many rows, block k from seed k: the rows do not depend
#: on how many are asked for, so the benchmark's inputs are the first rows of the evaluation run's
SYNTHETIC_BLOCK = 64
#: what the worker is doing, reported with a failure ("imports", "data", "warm", "load", "run", "write")
_stage = {"now": "start"}


# ------------------------------------------------------------------------------------ the session
def _import_toolchain(artifact: Artifact) -> Any:
    """The artifact's backend, with its toolchain imported so that its memory counts as baseline."""
    from edgeopt import backends

    backend = backends.get(artifact.backend)
    backend.check_available()
    for module in backend.requires:
        importlib.import_module(module)
    return backend


def _dataset(job: dict[str, Any], *, count: int) -> Dataset:
    signature = tuple(TensorSpec.model_validate(s) for s in job["signature"])
    if job.get("data_path"):
        return load_dataset(job["data_path"], signature=signature, role="evaluation")
    return _synthetic(signature, count=count)


def _synthetic(signature: tuple[TensorSpec, ...], *, count: int) -> Dataset:
    """``count`` synthetic rows, the same rows whatever ``count`` (``synthetic_dataset`` draws each input
    after the previous one, so its rows change with the count when a model has several inputs)."""
    blocks = [synthetic_dataset(signature, count=SYNTHETIC_BLOCK, seed=k)
              for k in range(max(1, math.ceil(count / SYNTHETIC_BLOCK)))]
    inputs = {name: np.concatenate([b.inputs[name] for b in blocks])[:count] for name in blocks[0].inputs}
    digest = hashlib.sha256(repr(("blocks", SYNTHETIC_BLOCK, signature)).encode()).hexdigest()
    return Dataset(None, f"synthetic-{digest[:16]}", inputs, None, blocks[0].feeds)


def _check_finite(outputs: list[np.ndarray], candidate: str, names: list[str] | None = None) -> None:
    for i, out in enumerate(outputs):
        arr = np.asarray(out)
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            name = names[i] if names and i < len(names) else f"output_{i}"
            raise CandidateFailed("accuracy", f"candidate '{candidate}': {name} has {bad} NaN/inf values "
                                              f"out of {arr.size}")


# ------------------------------------------------------------------------------------------- jobs
def _measure(job: dict[str, Any]) -> dict[str, Any]:
    artifact = Artifact.model_validate(job["artifact"])
    s = job["settings"]
    _stage["now"] = "imports"
    backend = _import_toolchain(artifact)
    rss_after_imports = memory.rss_mb()

    _stage["now"] = "data"
    bs = int(s["batch_size"])
    ds = _dataset(job, count=int(s["eval_samples"])).head(int(s["eval_samples"]))
    count = ds.count
    feeds = [{k: v if v.flags.c_contiguous else np.ascontiguousarray(v)  # (a 0-d input stays 0-d)
              for k, v in ds.sample(i * bs, batch_size=bs).items()}
             for i in range(max(1, math.ceil(count / bs)))]
    runtime, sequence = split_runtime(artifact.runtime)
    spans: list[tuple[int, int]] = []  # (full, used) sequence length of each feed
    if sequence:  # each input at its real (or bucketed) length
        trimmed = [trim(f, sequence) for f in feeds]
        feeds, spans = [t[0] for t in trimmed], [(t[1], t[2]) for t in trimmed]
    lengths = [f["attention_mask"].shape[1] for f in feeds if getattr(f.get("attention_mask"), "ndim", 0) == 2]
    shapes = {k: list(np.shape(v)) for k, v in feeds[0].items()}  # what the model is fed, batch included
    # every distinct set of shapes fed (per-sample data: each sample at its own)
    feed_shapes = sorted({tuple((k, tuple(np.shape(v))) for k, v in sorted(f.items())) for f in feeds})
    data_id = ds.sha256
    del ds
    memory.settle()
    rss_after_data = memory.rss_mb()

    _stage["now"] = "warm"
    warmed = _warm(backend, runtime)
    probe = memory.MemoryProbe()
    probe.reference()

    _stage["now"] = "load"
    t0 = time.perf_counter_ns()
    session = backend.load(path=artifact.path, runtime=runtime)
    load_time_ms = (time.perf_counter_ns() - t0) / 1e6
    _stage["now"] = "run"
    session = faults.inject(session, s.get("memory_limit_mb"), candidate=artifact.candidate, timed=True)
    names = list(getattr(session, "output_names", None) or []) or None
    run = session.run

    # one untimed pass over every distinct input checks the outputs and doubles as warm-up
    for feed in feeds:
        _check_finite(run(feed), artifact.candidate, names)
    n = len(feeds)
    for i in range(int(s["warmup_runs"])):
        run(feeds[i % n])

    min_runs, max_runs = int(s["min_runs"]), int(s["max_runs"])
    min_ns, max_ns = int(s["min_duration_s"] * 1e9), int(s["max_duration_s"] * 1e9)
    # audit: the first pass over the full batches (feed i holds rows i*bs .. i*bs+bs-1) is kept
    capture = min(AUDIT_CAPTURE, count // bs)
    captured: list[list[np.ndarray]] = []
    keep = captured.append
    lat_ns = array("q")  # raw int64: no int object per run stays behind in Python's allocator
    append, clock = lat_ns.append, time.perf_counter_ns
    probe.mark_working_set()  # the model-file pages the timed runs touch count as steady memory
    gc.collect()
    gc.disable()
    faults.timing["on"] = True
    timed_start_unix = time.time()
    start = clock()
    try:
        i = 0
        while True:
            feed = feeds[i % n]
            t_a = clock()
            out = run(feed)
            t_b = clock()
            append(t_b - t_a)
            if i < capture:
                keep(out)
            i += 1
            elapsed = t_b - start
            if i >= max_runs or elapsed >= max_ns or (i >= min_runs and elapsed >= min_ns):
                break
    finally:
        faults.timing["on"] = False
        gc.enable()
    duration_s = (clock() - start) / 1e9
    timed_end_unix = time.time()
    _check_finite(out, artifact.candidate, names)
    repeat = audit.repeat_ratio(run, feeds, inputs=AUDIT_FEEDS, repeats=AUDIT_REPEATS,
                                budget_s=AUDIT_BUDGET * duration_s)

    _stage["now"] = "write"
    samples = np.frombuffer(lat_ns, dtype=np.int64).astype(np.float64) / 1e6
    samples_path = Path(job["samples_path"])
    with open(samples_path, "wb") as fh:
        np.save(fh, samples)
    audit_path = audit.write_capture(Path(job["audit_path"]), captured, batch_size=bs, spans=spans) \
        if job.get("audit_path") else None
    audit_batches, samples_n = min(capture, len(lat_ns)), int(samples.size)
    del captured, out, feed, lat_ns, samples, append  # the harness's own data is not the model's memory
    figures = probe.steady(rss_after_data=rss_after_data)  # the session is still loaded here
    if not warmed:
        figures["memory_source"] += "; runtime not warmed"
    return {
        "samples": samples_n,
        "samples_path": str(samples_path),
        "load_time_ms": load_time_ms,
        "duration_s": duration_s,
        "rss_after_imports_mb": rss_after_imports,
        "rss_after_data_mb": rss_after_data,
        **figures,
        "distinct_inputs": n,
        "data": data_id,
        "tool_versions": backend.tool_versions(),
        "timed_start_unix": timed_start_unix,
        "timed_end_unix": timed_end_unix,
        "sequence": sequence["mode"] if sequence else "fixed",
        "seq_len_mean": float(np.mean(lengths)) if lengths else None,
        "input_shapes": shapes,
        "feed_shapes": [{k: list(v) for k, v in fs} for fs in feed_shapes],
        "audit_path": audit_path,
        "audit_batches": audit_batches,
        "audit_repeat_ratio": repeat.ratio,
        "audit_repeat_ratios": [[round(r, 4), kind] for r, kind in repeat.per_input],
    }


def _warm(backend: Any, runtime: dict[str, Any]) -> bool:
    """``backend.warm``; a failure is logged (the runtime's own memory then counts as the model's)."""
    try:
        backend.warm(runtime=runtime)
    except (CandidateFailed, ConfigError, BackendUnavailable):
        raise
    except Exception as exc:  # noqa: BLE001 - the tiny model is not the candidate: measure on, say so
        log.warning("warming the %s runtime on a tiny model failed (%s: %s); its libraries load with the "
                    "model and count as the model's memory", backend.name, type(exc).__name__, exc)
        return False
    return True


def _infer(job: dict[str, Any]) -> dict[str, Any]:
    artifact = Artifact.model_validate(job["artifact"])
    _stage["now"] = "imports"
    backend = _import_toolchain(artifact)
    _stage["now"] = "data"
    max_samples = job.get("max_samples")
    ds = _dataset(job, count=int(max_samples or 16))
    if max_samples:
        ds = ds.head(int(max_samples))
    _stage["now"] = "load"
    runtime, sequence = split_runtime(artifact.runtime)
    session = backend.load(path=artifact.path, runtime=runtime)
    _stage["now"] = "run"
    session = faults.inject(session, None, candidate=artifact.candidate)
    names = list(getattr(session, "output_names", None) or []) or None

    bs, count = int(job["batch_size"]), ds.count
    chunks: list[list[np.ndarray]] = []
    for start in range(0, count, bs):
        valid = min(bs, count - start)
        feed = ds.sample(start, batch_size=bs)  # the last batch wraps around; cut back below
        if sequence:
            feed, full, used = trim(feed, sequence)
            outs = pad_outputs(session.run(feed), full=full, used=used)
        else:
            outs = session.run(feed)
        outs = [o[:valid] if np.ndim(o) > 0 and o.shape[0] == bs else o for o in outs]
        chunks.append(outs)
    arrays = {}
    for i in range(len(chunks[0])):
        arrays[f"output_{i}"] = _joined([np.asarray(c[i]) for c in chunks], artifact.candidate, i)
    _check_finite(list(arrays.values()), artifact.candidate, names)
    if names:
        arrays["output_names"] = np.asarray(names, dtype=str)

    _stage["now"] = "write"
    out_path = Path(job["out_path"])
    tmp = out_path.with_name(out_path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, out_path)
    return {"samples": count, "outputs": len(chunks[0]), "out_path": str(out_path)}


def _joined(parts: list[np.ndarray], candidate: str, index: int) -> np.ndarray:
    """One output of every batch as rows: concatenated along the first axis; outputs whose sizes vary with
    the sample (a dense prediction ``[batch, C, H, W]`` of per-sample images) become one row per position,
    ``[batch * H * W, C]`` (channels last), so each position compares with the baseline's."""
    if parts[0].ndim == 0:
        return np.stack(parts)
    if len({p.shape[1:] for p in parts}) == 1:
        return np.concatenate(parts, axis=0)
    if all(p.ndim >= 3 for p in parts) and len({p.shape[1] for p in parts}) == 1:
        return np.concatenate([np.moveaxis(p, 1, -1).reshape(-1, p.shape[1]) for p in parts], axis=0)
    raise CandidateFailed("accuracy", f"candidate '{candidate}': output_{index} has shapes "
                          f"{sorted({p.shape for p in parts})} for different samples, which cannot be compared "
                          "position by position")


# ------------------------------------------------------------------------------------------- main
def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return " | ".join(lines)[:500] if lines else ""


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def _failure(exc: BaseException) -> dict[str, Any]:
    """The result payload for an exception: its class, a one-line message, and a reason if known."""
    reasons = {BackendUnavailable: "unavailable", ModelError: "build-error", MemoryError: "oom",
               DataError: "missing-data"}
    payload: dict[str, Any] = {"ok": False, "error": type(exc).__name__}
    if isinstance(exc, CandidateFailed):
        payload["reason"] = exc.reason
    for cls, reason in reasons.items():
        if isinstance(exc, cls):
            payload["reason"] = reason
    known = (CandidateFailed, BackendUnavailable, ModelError, DataError, ConfigError)
    payload["message"] = _one_line(str(exc) if isinstance(exc, known) else f"{type(exc).__name__}: {exc}")
    return payload


def main(argv: list[str] | None = None) -> int:
    """Run the job in ``argv[0]``; write its result JSON; return the exit code (0 = ok)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m edgeopt.bench.worker JOB.json\n")
        return 2
    faulthandler.enable()  # native crashes dump the Python stack to stderr, then die by the signal
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    job = json.loads(Path(args[0]).read_text())
    started = time.time()
    code = 1
    try:
        from edgeopt.bench.generate import run_generate_job
        from edgeopt.evaluate.llm import run_eval_job

        jobs = {"measure": _measure, "infer": _infer, "generate": run_generate_job, "llm-eval": run_eval_job}
        if job.get("mode") not in jobs:
            raise ConfigError(f"unknown job mode {job.get('mode')!r} (allowed: {', '.join(jobs)})")
        payload: dict[str, Any] = {"ok": True, **jobs[job["mode"]](job)}
        _stage["now"] = "done"
        code = 0
    except Exception as exc:  # every failure goes to the result file, classified
        if not isinstance(exc, (CandidateFailed, BackendUnavailable, ModelError, DataError, ConfigError)):
            log.exception("job failed")
        payload = _failure(exc)
    payload.update(stage=_stage["now"], started_unix=started, finished_unix=time.time(), pid=os.getpid())
    _write_json(Path(job["result_path"]), payload)
    return code


if __name__ == "__main__":
    _code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_code)  # skip interpreter teardown: a toolchain's crash at exit is not the candidate's
