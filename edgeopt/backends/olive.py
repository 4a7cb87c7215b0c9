"""Microsoft Olive backend: Olive's passes as candidate generators, measured and gated like the rest.

Public surface: ``OliveRecipe``, ``OlivePass`` and ``OliveBackend``. A recipe lists Olive passes
(ONNX Runtime static / dynamic quantization, the transformer optimizer, float16 conversion...) with
Olive's own parameter names; ``edgeopt.backends.olive_run`` turns it into an Olive workflow config and
runs it in a fresh process (network blocked, telemetry off, a timeout), feeding static quantization
edgeopt's calibration data (``edgeopt.backends.olive_data``).

With ``each_pass: true``, every pass's output model is a candidate of its own (``<name>.<pass>``),
all from one Olive run. Whatever Olive's exit code, a candidate is built only when its model is in
the run's record, loads and runs; otherwise it fails with a classified reason (``network``,
``no-output``, ``build-error``, ``invalid-output``, ``timeout``, ``crash``) and Olive's log and config
attached as evidence. Olive and onnxruntime are imported only in the Olive process and when loading.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgeopt.backends import olive_run
from edgeopt.backends.base import Backend, Recipe, short_message
from edgeopt.data import file_sha256
from edgeopt.errors import CandidateFailed
from edgeopt.records import Artifact

if TYPE_CHECKING:
    from edgeopt.backends.onnxruntime import OrtSession
    from edgeopt.data import Dataset
    from edgeopt.records import Assessment, ModelRef

__all__ = ["PASS_OPTIONS", "OliveBackend", "OlivePass", "OliveRecipe"]

log = logging.getLogger(__name__)

PassType = Literal["transformer-optimization", "quantize-static", "quantize-dynamic", "fp16", "quant-preprocess",
                   "peephole"]

_QUANT = ("per_channel", "reduce_range", "op_types_to_quantize", "op_types_to_exclude", "nodes_to_exclude",
          "quant_preprocess", "precision", "weight_symmetric", "activation_symmetric")
#: the Olive parameters each pass takes here (Olive's names; Olive validates their values when it runs)
PASS_OPTIONS: dict[str, tuple[str, ...]] = {
    "transformer-optimization": ("model_type", "num_heads", "hidden_size", "opt_level", "only_onnxruntime",
                                 "float16", "keep_io_types", "use_gpu", "optimization_options"),
    "quantize-static": (*_QUANT, "calibrate_method", "quant_format", "activation_type", "calibration_providers"),
    "quantize-dynamic": _QUANT,
    "fp16": ("keep_io_types", "op_block_list", "node_block_list", "min_positive_val", "max_finite_val"),
    "quant-preprocess": ("skip_optimization", "skip_onnx_shape", "skip_symbolic_shape"),
    "peephole": (),
}


class OlivePass(BaseModel):
    """One Olive pass of a recipe (in YAML a bare name, or a mapping with ``type`` and ``options``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: PassType = Field(description="the pass: " + ", ".join(f"{k} (Olive's {v})"
                                                              for k, v in olive_run.OLIVE_TYPES.items()))
    name: str | None = Field(default=None, description="its output's name (candidate suffix with outputs: each); "
                             "default: the type")
    options: dict[str, Any] = Field(default_factory=dict, description="Olive's parameters of the pass, by Olive's "
                                    "names; allowed per pass: see PASS_OPTIONS")
    search: dict[str, list[str | int | float | bool]] = Field(
        default_factory=dict, description="parameters Olive searches (Olive's names, each with its values): every "
        "point of the search is a candidate <name>.<values> from the one Olive run; parameters not listed keep "
        "their fixed value (Olive's own default search space is not used)")

    @field_validator("name")
    @classmethod
    def _slug(cls, v: str | None) -> str | None:
        if v is not None and (not v or not all(c.isalnum() or c in "-_" for c in v)):
            raise ValueError(f"pass names use letters, digits, '-' and '_'; got {v!r}")
        return v

    @model_validator(mode="after")
    def _known_options(self) -> OlivePass:
        allowed = PASS_OPTIONS[self.type]
        unknown = sorted((set(self.options) | set(self.search)) - set(allowed))
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))} for Olive pass {self.type!r} "
                             f"(allowed: {', '.join(allowed) or 'none'})")
        both = sorted(set(self.options) & set(self.search))
        if both:
            raise ValueError(f"{', '.join(map(repr, both))} is both a fixed option and searched in Olive pass "
                             f"{self.type!r}; keep one")
        for key, values in self.search.items():
            if len(values) < 2 or len({repr(v) for v in values}) != len(values):
                raise ValueError(f"search {key!r} of Olive pass {self.type!r} needs two or more distinct values; "
                                 f"got {values!r}")
        return self

    @property
    def output_name(self) -> str:
        return self.name or self.type

    def precision(self) -> str | None:
        """The precision its output computes in, when this pass changes it."""
        if self.type.startswith("quantize-"):
            return "int8"
        if self.type == "fp16" or (self.type == "transformer-optimization" and self.options.get("float16")):
            return "fp16"
        return None


class OliveRecipe(Recipe):
    """An Olive workflow (its passes, in order) and how its output runs."""

    passes: tuple[OlivePass, ...] = Field(
        default=(OlivePass(type="quantize-dynamic"),), min_length=1,
        description="Olive passes run in order, each on the previous one's output")
    each_pass: bool = Field(
        default=False, description="False: the last pass's model is the candidate; True: every pass's model is a "
        "candidate <name>.<pass> (e.g. the fused FP32 graph and its INT8 version), all from one Olive run")
    output: str | None = Field(
        default=None, description="the pass whose model this candidate is (the plan sets it when each_pass is "
        "true); None: the last")
    point: dict[str, dict[str, Any]] | None = Field(
        default=None, description="the search point this candidate is (pass name -> searched values; the plan "
        "sets it when a pass has a search); None: no search")
    calibration_samples: int = Field(
        default=128, gt=0, description="quantize-static: calibration samples (the first N of the data, batch 1)")
    execution_provider: Literal["cpu", "cuda", "tensorrt"] = Field(
        default="cpu", description="ONNX Runtime execution provider Olive targets and the artifact runs on")
    intra_op_threads: int | None = Field(default=None, ge=1, description="threads inside one operator; None: the "
                                         "profile's default")
    timeout_s: float = Field(default=900.0, gt=0, description="an Olive run longer than this fails as 'timeout'")

    @field_validator("passes", mode="before")
    @classmethod
    def _bare_names(cls, v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return tuple({"type": p} if isinstance(p, str) else p for p in v)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> OliveRecipe:
        names = [p.output_name for p in self.passes]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"pass name(s) {', '.join(twice)} used twice; give each a distinct 'name'")
        if self.output is not None and self.output not in names:
            raise ValueError(f"output {self.output!r} is not one of the passes (allowed: {', '.join(names)})")
        if self.searched and self.each_pass:
            raise ValueError("each_pass and a pass 'search' cannot be combined: a search's candidates are its "
                             "points (the last pass's models)")
        return self

    @property
    def searched(self) -> bool:
        return any(p.search for p in self.passes)

    def needs_calibration(self) -> bool:
        # the whole run's passes, not only this output's: the candidates of one run share its data (and key).
        # A search needs data too: Olive refuses to search without an evaluator, which runs on it
        return self.searched or any(p.type == "quantize-static" for p in self.passes)

    def search_points(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Every point of the recipe's search, by its name (the searched values, slugged and joined)."""
        axes = [(p.output_name, key, values) for p in self.passes for key, values in p.search.items()]
        points: dict[str, dict[str, dict[str, Any]]] = {}
        for combo in itertools.product(*(values for _, _, values in axes)):
            point: dict[str, dict[str, Any]] = {}
            for (pass_name, key, _), value in zip(axes, combo):
                point.setdefault(pass_name, {})[key] = value
            points["-".join(_slug(v) for v in combo)] = point
        return points

    def outputs(self) -> dict[str, dict[str, Any]]:
        if self.searched and self.point is None:
            return {name: {"point": point} for name, point in self.search_points().items()}
        if self.each_pass and self.output is None:
            return {p.output_name: {"output": p.output_name} for p in self.passes}
        return {}

    def runtime_options(self) -> dict[str, Any]:
        return {"intra_op_threads": self.intra_op_threads, "inter_op_threads": None, "execution_mode": "sequential",
                "execution_provider": self.execution_provider, "graph_optimization": "all"}

    def _upto(self) -> tuple[OlivePass, ...]:
        """The passes that make this candidate's model (all of them, or up to ``output``)."""
        if self.output is None:
            return self.passes
        end = [p.output_name for p in self.passes].index(self.output)
        return self.passes[: end + 1]

    def chosen(self) -> tuple[int, OlivePass]:
        passes = self._upto()
        return len(passes) - 1, passes[-1]

    def precision(self) -> str:
        found = [p.precision() for p in self._upto() if p.precision()]
        return found[-1] if found else "fp32"


class OliveBackend(Backend):
    """Builds ONNX candidates with Olive's passes (one Olive process per run)."""

    name: ClassVar[str] = "olive"
    formats: ClassVar[frozenset[str]] = frozenset({"onnx"})
    devices: ClassVar[frozenset[str]] = frozenset({"cpu", "gpu"})
    extra: ClassVar[str] = "olive"
    recipe_type: ClassVar[type[Recipe]] = OliveRecipe
    requires: ClassVar[tuple[str, ...]] = ("olive", "onnxruntime")
    distributions: ClassVar[tuple[str, ...]] = ("olive-ai", "onnxruntime", "onnx")
    calibrated_recipe: ClassVar[str] = "Olive's static quantization"

    def optimize(self, *, model: ModelRef, assessment: Assessment, recipe: Recipe, candidate: str,
                 out_dir: Path, calibration: Dataset | None = None) -> Artifact:
        self.check_request(model=model, recipe=recipe, candidate=candidate, calibration=calibration)
        recipe = cast(OliveRecipe, recipe)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        recipe, choices = _with_cpu_choices(recipe)
        index, chosen = recipe.chosen()
        wants_data = recipe.needs_calibration()
        data_path = calibration.path if calibration is not None and wants_data else None
        if wants_data and calibration is not None and data_path is None:
            raise CandidateFailed("missing-data", f"{candidate}: Olive reads calibration data from a file; "
                                  "this data set has none (pass --calibration DATA.npz)")
        result = olive_run.run(
            model_path=str(Path(model.path).resolve()), model_sha=model.sha256, recipe=recipe,
            runs_dir=out_dir.parent / ".olive-runs", calibration=data_path,
            calibration_sha=calibration.sha256 if data_path and calibration else None,
            input_names=[i.name for i in assessment.inputs], tools=self.tool_versions())
        evidence = self._evidence(result, out_dir)
        source = _chosen_model(result, index=index, chosen=chosen, recipe=recipe, candidate=candidate,
                               evidence=evidence)
        final = out_dir / "model.onnx"
        with tempfile.TemporaryDirectory(prefix=".build-", dir=out_dir) as tmp:
            built = Path(tmp) / "model.onnx"
            try:
                _copy_onnx(source, built)
            except Exception as exc:  # an unreadable model file (truncated, not ONNX)
                raise CandidateFailed("invalid-output", f"{candidate}: Olive's output model {source} does not load: "
                                      f"{short_message(exc)}", evidence=evidence) from exc
            where = _verify(built, recipe=recipe, candidate=candidate, evidence=evidence)
            os.replace(built, final)
            for data in Path(tmp).iterdir():  # external data beside the model
                os.replace(data, out_dir / data.name)
        passes = [p.output_name for p in recipe.passes]
        point = [f"{name}.{k}={v}" for name, values in (recipe.point or {}).items() for k, v in values.items()]
        notes = [f"olive passes: {' -> '.join(passes[: index + 1])} (output of '{chosen.output_name}')"
                 + (f"; search point {', '.join(point)} of {len(recipe.search_points())}" if point else ""),
                 (f"olive run {result.folder.name}: {len(result.models)} model(s) from {len(passes)} pass(es), "
                  f"{result.duration_s:.1f} s incl. start-up"), *choices]
        if data_path:
            notes.append(f"calibrated on the first {recipe.calibration_samples} samples of {Path(data_path).name}")
        notes += where.describe()
        size = final.stat().st_size
        log.info("%s: built %s from olive run %s (%d bytes)", candidate, final, result.folder.name, size)
        return Artifact(candidate=candidate, backend=self.name, path=str(final), sha256=file_sha256(final),
                        size_bytes=size, parent_sha256=model.sha256, precision=recipe.precision(),
                        runtime=recipe.runtime_options(), tool_versions=self.tool_versions(), notes=tuple(notes),
                        placement=where.as_dict(), evidence=evidence)

    def load(self, *, path: str, runtime: dict[str, Any]) -> OrtSession:
        from edgeopt.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend().load(path=path, runtime=runtime)

    @staticmethod
    def _evidence(result: olive_run.RunResult, out_dir: Path) -> tuple[str, ...]:
        """Olive's config and log, copied beside the candidate (each candidate keeps its own)."""
        kept = []
        for src, name in ((result.config_path, "olive_config.json"), (result.log_path, "olive.log"),
                          (result.folder / "result.json", "olive_result.json")):
            if src.is_file():
                shutil.copyfile(src, out_dir / name)
                kept.append(str(out_dir / name))
        return tuple(kept)


def _slug(value: Any) -> str:
    text = str(value).lower() if not isinstance(value, bool) else ("on" if value else "off")
    return re.sub(r"[^a-z0-9]+", "", text.replace(".", "p")) or "x"


def _with_cpu_choices(recipe: OliveRecipe) -> tuple[OliveRecipe, list[str]]:
    """The recipe with ``reduce_range`` of its static quantization passes chosen from this CPU where the
    recipe leaves it open, as edgeopt's own static INT8 does (``ort_quantize.choose_reduce_range``: on for
    x86-64 without VNNI, whose u8×s8 kernels can saturate); Olive's default is off everywhere."""
    from edgeopt.hardware import cpu_features, u8s8_saturates

    arch, flags = cpu_features()
    on = recipe.execution_provider == "cpu" and u8s8_saturates(arch=arch, isa_flags=flags)
    passes, notes = [], []
    for p in recipe.passes:
        if p.type == "quantize-static" and "reduce_range" not in p.options and "reduce_range" not in p.search:
            p = p.model_copy(update={"options": p.options | {"reduce_range": on}})
            notes.append(f"{p.output_name}: reduce_range {'on (7-bit weights): this CPU has no VNNI' if on else 'off'}"
                         " (chosen by edgeopt; set it in the pass options to override)")
        passes.append(p)
    return recipe.model_copy(update={"passes": tuple(passes)}), notes


def _chosen_model(result: olive_run.RunResult, *, index: int, chosen: OlivePass, recipe: OliveRecipe,
                  candidate: str, evidence: tuple[str, ...]) -> Path:
    """The model file of pass ``index`` in the run's record, or the classified reason there is none."""
    log_hint = f"; Olive's log: {result.log_path}"
    if result.timed_out:
        raise CandidateFailed("timeout", f"{candidate}: the Olive run took longer than {recipe.timeout_s:.0f} s"
                              + log_hint, evidence=evidence)
    models = result.models
    if recipe.point is not None:
        models = _point_chain(result, recipe)
    have = len(models) > index and not models[index]["pruned"] and models[index].get("model_path")
    if have:
        return Path(models[index]["model_path"])
    why = result.log_reason() or result.error or ""
    if result.network_attempts:
        raise CandidateFailed("network", f"{candidate}: Olive tried to reach the network "
                              f"({', '.join(result.network_attempts[:3])}), which edgeopt blocks: {short_message(why)}"
                              + log_hint, evidence=evidence)
    if _NETWORK_MARKERS.search(why):
        raise CandidateFailed("network", f"{candidate}: an Olive pass needed the network, which edgeopt builds never "
                              f"use: {short_message(why)}" + log_hint, evidence=evidence)
    failed = next((i for i, m in enumerate(models) if m["pruned"]), None)
    names = [p.output_name for p in recipe.passes]
    if failed is None and result.error and result.last_pass_started() in names:  # the pass raised out of Olive
        failed = names.index(result.last_pass_started())
    if failed is not None:
        name = names[failed]
        raise CandidateFailed(_classify(why), f"{candidate}: Olive's pass {name!r} failed"
                              + (f" (before {chosen.output_name!r})" if failed < index else "")
                              + f": {short_message(why or 'no reason in the log')}" + log_hint, evidence=evidence)
    if result.exit_code not in (0, None) and not models:
        raise CandidateFailed("crash" if (result.exit_code or 0) < 0 else _classify(why),
                              f"{candidate}: the Olive process ended with exit code {result.exit_code}: "
                              f"{short_message(why or 'no reason in the log')}" + log_hint, evidence=evidence)
    raise CandidateFailed("no-output", f"{candidate}: Olive produced no output model for pass "
                          f"{chosen.output_name!r} (exit code {result.exit_code}, not taken as success)"
                          + (f": {short_message(why)}" if why else "") + log_hint, evidence=evidence)


def _point_chain(result: olive_run.RunResult, recipe: OliveRecipe) -> list[dict[str, Any]]:
    """The models of the search point ``recipe.point``, one per pass in order, as far as the run made them.

    A node belongs to the point when it came from the pass's Olive type with the point's values for that
    pass; Olive runs identical prefixes once, so the chain branches only where the searched values differ."""
    point = recipe.point or {}
    by_parent: dict[str | None, list[dict[str, Any]]] = {}
    ids = {m["model_id"] for m in result.all_models}
    for m in result.all_models:
        by_parent.setdefault(m["parent"] if m["parent"] in ids else None, []).append(m)
    chain: list[dict[str, Any]] = []
    parent: str | None = None
    for p in recipe.passes:
        wanted = point.get(p.output_name, {})
        found = [m for m in by_parent.get(parent, []) if m["pass"] == olive_run.OLIVE_TYPES[p.type].lower()
                 and all(_same((m.get("config") or {}).get(k), v) for k, v in wanted.items())]
        if not found:
            break
        best = next((m for m in found if not m["pruned"]), found[0])
        chain.append(best)
        parent = best["model_id"]
    return chain


def _same(recorded: Any, wanted: Any) -> bool:
    """Olive records enum values in its own spelling (``uint8``, ``MinMax``): compare case-insensitively."""
    if isinstance(wanted, str) and isinstance(recorded, str):
        return recorded.lower() == wanted.lower()
    return recorded == wanted


#: what a download refused offline says (huggingface_hub / datasets offline mode, refused connections)
_NETWORK_MARKERS = re.compile(r"offline ?mode|OfflineModeIsEnabled|couldn't reach|network access is blocked|"
                              r"failed to resolve|Name or service not known|ConnectionError", re.IGNORECASE)


def _classify(text: str) -> str:
    from edgeopt.backends.onnxruntime import classify

    return classify(RuntimeError(text))


def _copy_onnx(src: Path, dst: Path) -> None:
    """Copy an Olive output model (a file, or a folder holding one) with its external data files."""
    import onnx

    if src.is_dir():
        found = sorted(src.glob("*.onnx"))
        if len(found) != 1:
            raise ValueError(f"the folder holds {len(found)} .onnx files")
        src = found[0]
    shutil.copyfile(src, dst)
    model = onnx.load(str(src), load_external_data=False)
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    for loc in locations:
        shutil.copyfile(src.parent / loc, dst.parent / loc)


def _verify(path: Path, *, recipe: OliveRecipe, candidate: str, evidence: tuple[str, ...]) -> Any:
    """Load the model and run it once as the benchmark will; ``invalid-output`` if it does not."""
    from edgeopt.backends.onnxruntime import _session_options
    from edgeopt.backends.ort_placement import placement

    try:
        opts, providers = _session_options(recipe.runtime_options(), who=candidate)
        return placement(str(path), options=opts, providers=providers)
    except CandidateFailed:
        raise
    except Exception as exc:
        raise CandidateFailed("invalid-output", f"{candidate}: Olive's output model does not load and run: "
                              f"{short_message(exc)}", evidence=evidence) from exc
