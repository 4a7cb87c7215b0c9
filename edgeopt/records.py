"""Frozen, plain records that flow between the phases of the workflow.

ModelRef → Assessment → CandidateSpec → Artifact → BenchmarkResult + EvalResult → GateVerdict
→ CandidateOutcome → Selection.  Tasks pass these records and paths, never live model objects.
Units are in field names (``latency_ms_p95``, ``rss_peak_mb``, ``size_bytes``).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "SCHEMA_VERSION",
    "Artifact",
    "Assessment",
    "BenchmarkResult",
    "CandidateOutcome",
    "CandidateSpec",
    "EvalResult",
    "Failure",
    "GateStatus",
    "GateVerdict",
    "GenerationResult",
    "HardwareFingerprint",
    "LLMEvalResult",
    "LLMInfo",
    "ModelKind",
    "ModelRef",
    "Record",
    "Selection",
    "TensorSpec",
]

ModelKind = Literal["cnn", "encoder", "llm", "rnn", "other"]
ModelFormat = Literal["onnx", "hf", "gguf"]


#: bumped whenever a record gains, loses or changes a field: results cached by an older edgeopt
#: (pickled records of the old shape) are then not reused
SCHEMA_VERSION = 9

class Record(BaseModel):
    """Base of every record: immutable, unknown fields rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class TensorSpec(Record):
    name: str
    dtype: str = Field(description="numpy dtype name, e.g. 'float32', 'int64'")
    shape: tuple[int | str, ...] = Field(description="static dims as ints, dynamic dims as their symbol ('?' if unnamed)")

    @property
    def dynamic_dims(self) -> tuple[int, ...]:
        return tuple(i for i, d in enumerate(self.shape) if not isinstance(d, int) or d <= 0)


class ModelRef(Record):
    path: str
    format: ModelFormat
    sha256: str
    size_bytes: int


class LLMInfo(Record):
    """What a language model is, read from its config (Hugging Face) or its metadata (GGUF)."""

    architecture: str = Field(description="e.g. 'LlamaForCausalLM' or the GGUF 'general.architecture'")
    family: str = Field(description="llama-like family: 'llama', 'qwen2', 'phi3', ...")
    context_length: int
    vocab_size: int
    layers: int
    hidden_size: int
    heads: int
    kv_heads: int
    head_dim: int
    kv_cache_bytes_per_token: int = Field(description="K and V of every layer at F16: 2 x layers x kv_heads x "
                                          "head_dim x 2 bytes")
    tokenizer: str = Field(description="tokenizer found: files beside the checkpoint, or the GGUF's embedded "
                           "'tokenizer.ggml.model'")
    tensor_types: dict[str, int] = Field(default_factory=dict, description="weight type -> number of tensors "
                                         "(e.g. {'F16': 26, 'F32': 9})")
    file_type: str = Field(default="", description="GGUF 'general.file_type' (e.g. 'MOSTLY_Q4_K_M'); '' for HF")


class Assessment(Record):
    model: ModelRef
    kind: ModelKind
    kind_reason: str = Field(default="", description="the trait that decided the kind, e.g. 'recurrent cells (LSTM)'")
    params: int = Field(description="weights in initializers and floating-point Constant nodes, subgraphs included")
    constant_params: int = Field(default=0, description="the part of params held in Constant nodes")
    opset: int | None = None
    ir_version: int | None = None
    producer: str = ""
    op_histogram: dict[str, int] = Field(default_factory=dict, description="every node, control-flow bodies "
                                         "(If / Loop / Scan) and local functions included")
    control_flow_ops: dict[str, int] = Field(default_factory=dict, description="the part of op_histogram inside "
                                             "If / Loop / Scan bodies")
    runtime_opsets: dict[str, int] = Field(default_factory=dict, description="newest ONNX opset each installed "
                                           "runtime loads")
    notes: tuple[str, ...] = Field(default=(), description="warnings found at assessment (e.g. an opset newer "
                                   "than a runtime loads)")
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    input_shapes: dict[str, tuple[int, ...]] = Field(
        default_factory=dict, description="the full shape each input runs at, batch included (from --shape, the "
        "profile's input_shapes, the evaluation data and the batch size; see edgeopt.input_shapes); empty until "
        "resolved for a run")
    per_sample_inputs: tuple[str, ...] = Field(
        default=(), description="inputs that run at each sample's own shape (evaluation data given as a folder of "
        "per-sample .npz feeds, see edgeopt.data_folder); input_shapes holds their first sample's shape")
    quantizable_ops: tuple[str, ...] = Field(default=(), description="op types the INT8 paths cover")
    unquantizable_ops: tuple[str, ...] = Field(default=(), description="op types they leave in float")
    int8_coverage: float = Field(default=0.0, description="share of nodes whose op the INT8 paths cover")
    llm: LLMInfo | None = Field(default=None, description="language models: architecture, context, vocabulary, "
                                "KV-cache bytes per token, weight types")


class HardwareFingerprint(Record):
    hostname: str
    os: str
    arch: str
    cpu_model: str
    isa_flags: tuple[str, ...]
    cores_physical: int
    cores_logical: int
    ram_mb: int
    gpus: tuple[str, ...] = ()
    python: str
    tool_versions: dict[str, str] = Field(default_factory=dict)


class CandidateSpec(Record):
    name: str
    backend: str
    recipe: dict[str, Any] = Field(default_factory=dict)
    baseline: bool = False
    sequence: Literal["fixed", "dynamic", "bucketed"] = Field(
        default="fixed", description="how text inputs are shaped when it runs (see edgeopt.bench.shapes)")
    buckets: tuple[int, ...] = Field(default=(), description="sequence lengths for 'bucketed'")

    def sequence_runtime(self) -> dict[str, Any]:
        """The runtime entry that carries the sequence choice ({} for fixed-length inputs)."""
        if self.sequence == "fixed":
            return {}
        return {"sequence": {"mode": self.sequence, "buckets": list(self.buckets)}}


class Artifact(Record):
    candidate: str
    backend: str
    path: str = Field(description="model file (or folder) produced by the backend")
    sha256: str
    size_bytes: int
    parent_sha256: str
    precision: str = Field(description="precision the artifact executes in, e.g. fp32, fp16, int8")
    runtime: dict[str, Any] = Field(default_factory=dict, description="options used to load and run it")
    tool_versions: dict[str, str] = Field(default_factory=dict)
    notes: tuple[str, ...] = ()
    placement: dict[str, Any] = Field(
        default_factory=dict, description="where it was seen to run after the build: target device or "
        "provider, 'target_share' of executed nodes on it (fallback detection), per-device shares")
    evidence: tuple[str, ...] = Field(default=(), description="files that document the build (a toolchain's "
                                      "config and log), recorded beside the model")


class Failure(Record):
    stage: Literal["build", "benchmark", "evaluate"]
    reason: str
    message: str
    evidence: tuple[str, ...] = Field(default=(), description="files that explain it (e.g. the toolchain's log)")


class BenchmarkResult(Record):
    candidate: str
    kind: Literal["latency"] = "latency"
    samples: int
    batch_size: int
    threads: int | None = None
    latency_ms_p50: float
    latency_ms_p90: float
    latency_ms_p95: float
    latency_ms_p99: float
    latency_ms_mean: float
    latency_ms_std: float
    latency_ms_min: float
    latency_ms_max: float
    throughput_per_s: float
    rss_peak_mb: float = Field(description="peak resident memory of the whole measuring process (MB), imports "
                               "and data included")
    rss_steady_mb: float = Field(description="steady-state memory of the loaded, warmed-up model (MB): anonymous "
                                 "RSS after the timed runs (allocator trimmed) minus anonymous RSS at the reference "
                                 "point (runtime imported, its libraries loaded and warmed on a tiny model, data "
                                 "built), plus the pages of model files mapped since then that the timed runs "
                                 "touched (weights used in place); NaN when it cannot be measured")
    rss_steady_file_mb: float = Field(default=math.nan, description="file-backed RSS the model added at steady "
                                      "state (MB): every mapped page still resident, used or not; reported, not gated")
    rss_peak_model_mb: float = Field(description="peak RSS during load and inference above the reference point "
                                     "(MB): the high-water mark reset at that point minus the RSS there; NaN when "
                                     "the peak cannot be reset (see memory_source)")
    memory_source: str = Field(default="", description="where the memory figures come from, e.g. "
                               "'RssAnon; VmHWM reset at reference' (Linux) or 'USS; ru_maxrss, not reset'")
    rss_steady_mb_repeats: tuple[float, ...] = Field(default=(), description="rss_steady_mb of each repeat")
    load_time_ms: float
    size_bytes: int
    duration_s: float
    samples_path: str | None = Field(default=None, description=".npy file of the raw latency samples (ms)")
    repeats: int = Field(default=1, description="fresh-process measurements pooled into this result")
    latency_ms_p50_repeats: tuple[float, ...] = Field(default=(), description="p50 of each repeat, in order")
    latency_p50_spread_pct: float = Field(default=0.0, description="(max - min) / median of the repeats' p50, %")
    repeat_sample_counts: tuple[int, ...] = Field(default=(), description="timed runs of each repeat, in order "
                                                  "(the pooled samples file holds them one repeat after another)")
    sequence: str = Field(default="fixed", description="text inputs ran 'fixed' (padded as given), 'dynamic' "
                          "(each at its real length) or 'bucketed'")
    seq_len_mean: float | None = Field(default=None, description="mean token length the inputs ran at "
                                       "(text models)")
    input_shapes: dict[str, tuple[int, ...]] = Field(default_factory=dict, description="the shape of each input "
                                                     "in the first timed run, batch included (as fed, in the worker)")
    inter_op_threads: int | None = Field(default=None, description="threads across operators it ran with")
    audit_path: str | None = Field(default=None, description=".npz of outputs captured inside the timed loop "
                                   "('index' = sample rows, 'output_<i>' = outputs), compared with the "
                                   "evaluation run's outputs for the same inputs (audit)")
    audit_repeat_ratio: float | None = Field(default=None, description="median latency on repeated identical "
                                             "inputs / median latency of the same inputs run after another input "
                                             "(with changing shapes, a same-shaped one); far below 1 means results "
                                             "are cached (audit)")
    hardware: HardwareFingerprint


class GenerationResult(Record):
    """A language model's generation benchmark (edgeopt.bench.generate): same prompt, same number of
    generated tokens and same threads for every candidate of a run."""

    candidate: str
    prompt_tokens: int
    gen_tokens: int = Field(description="tokens generated per repeat (EOS does not stop it)")
    repeats: int
    threads: int
    prompt_tps: float = Field(description="prompt processing tokens/s (median over repeats)")
    gen_tps: float = Field(description="generation tokens/s after the first token (median over repeats)")
    ttft_ms: float = Field(description="time to first token from an empty KV cache (median)")
    token_ms_p50: float
    token_ms_p95: float
    token_ms_p99: float
    token_samples: int = Field(description="per-token latencies behind the percentiles")
    rss_peak_mb: float = Field(description="peak RSS of the measuring process (MB)")
    rss_model_mb: float = Field(description="RSS the loaded model added (MB), mapped weights included")
    load_time_ms: float
    size_bytes: int
    gen_tps_rounds: tuple[float, ...] = Field(default=(), description="generation tokens/s of every repeat")
    bytes_per_token: int | None = Field(default=None, description="weights + KV cache read per generated token")
    bandwidth_gbps: float | None = Field(default=None, description="measured read bandwidth at these threads")
    bandwidth_fraction: float | None = Field(default=None, description="gen_tps x bytes_per_token / bandwidth")
    kv_cache_bytes_per_token: float | None = Field(default=None, description="K and V bytes per context token as "
                                                   "the runtime stores them (llama.cpp: the size its context log "
                                                   "reports for the recipe's KV-cache type; OpenVINO: the IR's KV "
                                                   "states in the CPU plugin's cache precision, with its scales); "
                                                   "None when the runtime does not report it")
    kv_context_tokens: int | None = Field(default=None, description="context length kv_cache_mb is given at (the "
                                          "profile's benchmark.llm.context_tokens)")
    kv_cache_mb: float | None = Field(default=None, description="KV-cache memory at kv_context_tokens (MiB)")
    not_representative: str | None = Field(default=None, description="why these speed figures do not stand for "
                                           "the target (e.g. MLX off Apple silicon); None: they do. The speed-up "
                                           "gate never passes on them")


class EvalResult(Record):
    candidate: str
    metric: str = Field(description="'top1_accuracy' with labels, else 'top1_agreement' with the baseline")
    value: float
    baseline: float
    delta: float
    samples: int
    top1_agreement: float
    cosine_mean: float
    cosine_min: float
    max_abs_error: float


class LLMEvalResult(Record):
    """A language model against its F16 reference on the evaluation text (edgeopt.evaluate.llm): the same
    non-overlapping windows of the same tokens for both."""

    candidate: str
    perplexity: float = Field(description="exp(mean next-token NLL) over the windows")
    baseline_perplexity: float = Field(description="the F16 reference's perplexity on the same windows")
    kld_mean: float = Field(description="mean KL(F16 || candidate) of the next-token distributions")
    kld_p99: float
    kld_max: float
    top1_agreement: float = Field(description="share of positions where both predict the same next token")
    tokens: int = Field(description="positions scored")
    window: int = Field(description="tokens per window")
    garbage: str = Field(default="", description="why the garbage check failed ('' when it passed)")


GateStatus = Literal["pass", "fail", "uncertain"]


class GateVerdict(Record):
    gate: str
    metric: str
    comparator: Literal[">=", "<="]
    threshold: float
    measured: float
    margin: float = Field(description="measured - threshold for '>=', threshold - measured for '<='")
    passed: bool = Field(description="settled pass: the whole confidence interval (if any) clears the threshold")
    status: GateStatus = Field(default="fail", description="'pass' (interval clears the threshold), 'fail' "
                               "(interval misses it entirely) or 'uncertain' (the interval straddles it)")
    ci_low: float | None = Field(default=None, description="lower bound of the measured value's confidence interval")
    ci_high: float | None = Field(default=None, description="upper bound of the measured value's confidence interval")
    confidence: float | None = Field(default=None, description="confidence level of [ci_low, ci_high], e.g. 0.95")
    run_to_run_sd: float | None = Field(default=None, description="this host's run-to-run standard deviation of "
                                        "the log ratio, the floor of the interval (speed-up verdicts)")
    runs_pooled: int | None = Field(default=None, description="runs on this host whose measurements of this "
                                    "comparison the interval pools, this one included (speed-up verdicts; "
                                    "edgeopt.reproducibility.pooled); 1 = this run alone")
    pooled_point: float | None = Field(default=None, description="the ratio pooled over runs_pooled runs (the "
                                       "geometric mean), the centre of [ci_low, ci_high] when runs_pooled > 1")
    held_from_run: int | None = Field(default=None, description="the verdict is this host's standing decision on "
                                      "the comparison: the runs pooled up to this one (1 = the first of "
                                      "runs_pooled) settled it, and no run since settled it the other way; "
                                      "[ci_low, ci_high], pooled over every run, straddles the threshold "
                                      "(edgeopt.reproducibility.sequential)")

    def describe(self) -> str:
        word = {"pass": "pass", "fail": "FAIL", "uncertain": "UNCERTAIN"}[self.status]
        ci = f" [{self.ci_low:.4g}, {self.ci_high:.4g}]" if self.ci_low is not None and self.ci_high is not None else ""
        if (self.runs_pooled or 1) > 1 and self.pooled_point is not None:
            ci = f" (pooled over {self.runs_pooled} runs on this host: {self.pooled_point:.4g}{ci})"
        if self.held_from_run is not None:
            ci += (f" — held: settled by the first {self.held_from_run} run(s) here, and no run since has "
                   "settled it the other way")
        return (f"{self.gate}: {self.measured:.4g}{ci} {self.comparator} {self.threshold:.4g} "
                f"({word}, margin {self.margin:+.4g})")


class CandidateOutcome(Record):
    spec: CandidateSpec
    artifact: Artifact | None = None
    benchmark: BenchmarkResult | None = None
    evaluation: EvalResult | None = None
    failure: Failure | None = None
    baseline: str | None = Field(default=None, description="the baseline measurement this candidate's ratios "
                                 "use: same inputs, sequence shapes and thread budget, measured interleaved with it")
    speedup_p50: float | None = None
    speedup_p95: float | None = None
    memory_reduction: float | None = Field(default=None, description="1 - memory / the baseline's, on the "
                                           "profile's memory basis (steady state by default)")
    verdicts: tuple[GateVerdict, ...] = ()
    generation: GenerationResult | None = Field(default=None, description="language models: the generation "
                                                "benchmark, pooled over the interleaved rounds")
    llm_eval: LLMEvalResult | None = Field(default=None, description="language models: perplexity, KLD and "
                                           "top-1 agreement against the F16 reference")

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def ok(self) -> bool:
        return self.failure is None and (self.benchmark is not None or self.generation is not None)

    @property
    def passed(self) -> bool:
        """Every gate settled as a pass (an uncertain gate is not a pass)."""
        return self.ok and not self.spec.baseline and bool(self.verdicts) and all(v.passed for v in self.verdicts)

    @property
    def uncertain(self) -> bool:
        """No gate failed outright, and at least one is uncertain (its interval straddles the threshold)."""
        return (self.ok and not self.spec.baseline and any(v.status == "uncertain" for v in self.verdicts)
                and not any(v.status == "fail" for v in self.verdicts))


class Selection(Record):
    selected: str | None
    frontier: tuple[str, ...] = ()
    passing: tuple[str, ...] = ()
    scores: dict[str, float] = Field(default_factory=dict)
    nearest_misses: tuple[str, ...] = Field(default=(), description="one line per near miss, nearest first")
    message: str
