"""The contract every backend module implements (see ``edgeopt.backends`` for the registry)."""

from __future__ import annotations

import importlib.util
import tempfile
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict

from edgeopt.errors import BackendUnavailable, CandidateFailed, ConfigError

if TYPE_CHECKING:
    import numpy as np

    from edgeopt.data import Dataset
    from edgeopt.profiles import Gates
    from edgeopt.records import Artifact, Assessment, ModelRef

__all__ = ["STDOUT_LOCK", "WARM_SIZE", "Backend", "Recipe", "Session", "short_message", "tiny_onnx_model"]

#: held by every ``contextlib.redirect_stdout`` of a toolchain's output: the swap is process-wide,
#: and builds run in threads of one process (a flow's task runner)
STDOUT_LOCK = threading.Lock()


class Recipe(BaseModel):
    """Base of a backend's typed recipe: every field documented, unknown fields rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def needs_calibration(self) -> bool:
        return False

    def runtime_options(self) -> dict[str, Any]:
        """Options the measuring process needs to load and run the artifact (threads, device...)."""
        return {}

    def outputs(self) -> dict[str, dict[str, Any]]:
        """The artifacts one build of this recipe yields, when it yields several: output name -> the recipe
        fields that pick that output. ``{}`` (the default): one artifact. The plan turns each output into a
        candidate ``<name>.<output>`` with those fields added; the backend builds them from one shared run
        (e.g. every pass of an Olive workflow)."""
        return {}

    def from_gates(self, *, gates: Gates, kind: str) -> dict[str, Any]:
        """Recipe fields that follow from the profile's gates for a ``kind`` of model (e.g. an accuracy
        budget a toolchain enforces while building); the flow adds them to the recipe before building."""
        return {}


class Session(Protocol):
    """A loaded artifact, ready to run inside the measuring process."""

    input_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class Backend(ABC):
    """One toolchain. Subclasses set the class attributes and implement ``optimize`` and ``load``; those that run
    language models also implement ``generate_job``, ``llm_session`` and (when they have the figure)
    ``weight_bytes_per_token``."""

    name: ClassVar[str]
    formats: ClassVar[frozenset[str]]
    devices: ClassVar[frozenset[str]]
    extra: ClassVar[str]
    recipe_type: ClassVar[type[Recipe]]
    #: import names of the optional packages this backend needs
    requires: ClassVar[tuple[str, ...]]
    #: distribution names whose versions are recorded with every artifact
    distributions: ClassVar[tuple[str, ...]] = ()
    #: the model kinds it builds (``Assessment.kind``); empty: every kind its formats hold
    model_kinds: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def available(cls) -> bool:
        return all(importlib.util.find_spec(mod) is not None for mod in cls.requires)

    @classmethod
    def check_available(cls) -> None:
        missing = [mod for mod in cls.requires if importlib.util.find_spec(mod) is None]
        if missing:
            raise BackendUnavailable(cls.name, cls.extra, f"missing: {', '.join(missing)}")

    @classmethod
    def tool_versions(cls) -> dict[str, str]:
        from edgeopt.hardware import distribution_versions

        return distribution_versions(cls.distributions)

    #: what needs calibration data, for the message when it is missing (e.g. "static INT8")
    calibrated_recipe: ClassVar[str] = "this recipe"

    def check_request(self, *, model: ModelRef, recipe: Recipe, candidate: str,
                      calibration: Dataset | None) -> None:
        """The checks every build starts with: recipe type, model format, calibration data, toolchain."""
        if not isinstance(recipe, self.recipe_type):
            raise ConfigError(f"{candidate}: the {self.name} backend needs a {self.recipe_type.__name__}, "
                              f"got {type(recipe).__name__}")
        if model.format not in self.formats:
            raise CandidateFailed("build-error", f"{candidate}: {self.name} builds "
                                  f"{', '.join(sorted(self.formats))} models, got {model.format!r}")
        if recipe.needs_calibration() and calibration is None:
            raise CandidateFailed("missing-data", f"{candidate}: {self.calibrated_recipe} needs calibration data; "
                                  "pass --calibration DATA")
        self.check_available()

    @abstractmethod
    def optimize(
        self,
        *,
        model: ModelRef,
        assessment: Assessment,
        recipe: Recipe,
        candidate: str,
        out_dir: Path,
        calibration: Dataset | None = None,
    ) -> Artifact:
        """Build the candidate into ``out_dir``; raise ``CandidateFailed`` with a classified reason."""

    @abstractmethod
    def load(self, *, path: str, runtime: dict[str, Any]) -> Session:
        """Load an artifact for measurement (called inside the fresh measuring process)."""

    def warm(self, *, runtime: dict[str, Any]) -> None:
        """Load the runtime's own libraries, thread pools and kernels before the memory reference point.

        The measuring process calls this before it takes its reference reading, so that what any model
        of this runtime needs (a device plugin, thread pools, kernel registries) is not counted as the
        artifact's memory. The default loads a tiny ONNX model (MatMul 16x16 + Relu) with ``load`` and
        the same ``runtime`` options, runs it once and releases it; backends whose ``load`` does not take
        a ``.onnx`` file override it.
        """
        import numpy as np

        with tempfile.TemporaryDirectory(prefix="edgeopt-warm-") as tmp:
            path = Path(tmp) / "warm.onnx"
            path.write_bytes(tiny_onnx_model())
            session = self.load(path=str(path), runtime=runtime)
            session.run({session.input_names[0]: np.ones((1, WARM_SIZE), dtype=np.float32)})
            del session

    # Language models: the hooks the generation benchmark (``edgeopt.bench.generate``), the evaluators
    # (``edgeopt.evaluate.llm``) and the bandwidth bound call through the registry, by the artifact's backend name.

    def generate_job(self, job: dict[str, Any]) -> dict[str, Any]:
        """Worker side of a generation measurement (in the fresh measuring process): load ``job["path"]`` with
        ``job["runtime"]``, warm up, then time ``job["repeats"]`` generations of exactly ``job["gen_tokens"]``
        greedy tokens from ``job["prompt"]``, each from an empty KV cache; returns
        ``edgeopt.bench.generate.generation_figures``. The default: a ``ConfigError``."""
        raise ConfigError(f"backend {self.name!r} does not run language models (no generation benchmark)")

    def llm_session(self, *, path: str, runtime: dict[str, Any], window: int) -> Any:
        """The artifact behind the llama.cpp-like surface ``edgeopt.evaluate.llm`` uses (``tokenize``, ``reset``,
        ``eval``, ``scores`` of every position, greedy ``generate``, ``detokenize``, ``token_eos``), with room for
        windows of ``window`` tokens. The default: a ``ConfigError``."""
        raise ConfigError(f"backend {self.name!r} does not run language models (no perplexity or KLD evaluation)")

    def weight_bytes_per_token(self, *, path: str | Path) -> int | None:
        """Weight bytes one generated token reads from the artifact at ``path``: every weight as stored, but the
        token-embedding table's (one row of it is gathered). None (the default): no such figure, so no
        memory-bandwidth bound (a backend that does not run language models; MLX). A ``path`` that does not hold
        what the backend builds is a ``ModelError``."""
        return None


#: the tiny warm-up model's width: input x [batch, 16] float32 -> MatMul 16x16 -> Relu -> y
WARM_SIZE = 16


def tiny_onnx_model() -> bytes:
    """The warm-up model as ONNX bytes (IR version 9, opset 17: what every supported runtime reads)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.eye(WARM_SIZE, dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], "warm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WARM_SIZE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", WARM_SIZE])], [w])
    # onnx >= 1.23 writes IR version 14 by default, which onnxruntime <= 1.31 refuses
    model = helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString()


def short_message(exc: BaseException, limit: int = 300) -> str:
    """A toolchain exception as one line of at most ``limit`` characters (for CandidateFailed messages)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
