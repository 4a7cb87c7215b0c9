"""Hugging Face intake: assess a local checkpoint folder and export it to ONNX.

A checkpoint folder holds ``config.json``, ``*.safetensors`` weights and, for text models, tokenizer
files. ``assess_hf`` reads JSON only (the config and the safetensors headers): it never unpickles
and never imports torch. A folder with only pickle weights (``.bin``, ``.pt``, ``.pth``, ``.ckpt``)
is refused unless ``allow_pickle=True``, which loads them with ``torch.load(weights_only=True)``.

``export_onnx`` writes an encoder (a BERT-like ``...Model`` without a head) as ``model.onnx``:
inputs ``input_ids`` / ``attention_mask`` / ``token_type_ids`` (those the model takes; int64
``[batch, sequence]``), output ``last_hidden_state`` (float32 ``[batch, sequence, hidden]``), with
the tokenizer files and ``export.json`` beside it, checked against torch with onnxruntime.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import re
import shutil
import struct
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeopt.data import file_sha256
from edgeopt.errors import BackendUnavailable, ConfigError, ModelError
from edgeopt.records import Assessment, ModelKind, ModelRef, TensorSpec

__all__ = ["EXPORT_INFO_FILE", "PICKLE_SUFFIXES", "TOKENIZER_FILES", "Checkpoint", "assess_hf",
           "export_onnx", "inspect_checkpoint", "quiet_transformers", "safetensors_params"]

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
#: Pickle files the HF Trainer writes beside a checkpoint that are not model weights.
_NOT_WEIGHTS = re.compile(r"^(training_args\.bin|optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state.*\.pth)$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")
EXPORT_INFO_FILE = "export.json"
MODEL_FILE = "model.onnx"
OUTPUT_NAME = "last_hidden_state"
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
#: onnxruntime 1.31 refuses IR versions above 13; onnx 1.23 writes 14.
MAX_IR_VERSION = 10
#: onnxruntime's output must match torch's within this (float32).
MAX_ABS_DIFF = 1e-3


def _kinds(kind: ModelKind, names: str) -> dict[str, ModelKind]:
    return dict.fromkeys(names.split(), kind)


#: model_type -> kind (BERT-like encoders with a task head are assessed as "other").
_KINDS: dict[str, ModelKind] = {
    **_kinds("encoder", "bert roberta xlm-roberta distilbert albert electra mpnet deberta deberta-v2 "
                        "camembert ernie modernbert mobilebert squeezebert xlm luke nezha rembert roformer "
                        "megatron-bert data2vec-text xmod"),
    **_kinds("llm", "gpt2 gptj gpt_neo gpt_neox llama mistral mixtral qwen2 qwen2_moe qwen3 qwen3_moe "
                    "phi phi3 gemma gemma2 gemma3_text falcon opt bloom stablelm starcoder2 olmo olmo2 "
                    "granite smollm3 mpt codegen cohere exaone internlm2"),
    **_kinds("cnn", "resnet convnext convnextv2 efficientnet mobilenet_v1 mobilenet_v2 regnet bit van "
                    "poolformer levit mobilevit mobilevitv2 focalnet"),
    **_kinds("other", "vit deit beit swin swinv2 dinov2 clip siglip t5 mt5 bart mbart marian pegasus whisper "
                      "wav2vec2 hubert blip detr segformer yolos"),
}
#: Encoders whose tokenizers produce no token_type_ids (when tokenizer_config.json does not say).
_NO_TOKEN_TYPES = frozenset(_kinds("other", "distilbert roberta xlm-roberta camembert modernbert mpnet xmod"))
_HEAD = re.compile(r"(For[A-Z]\w*|LMHeadModel|WithLMHead\w*)$")
_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint folder holds, read without loading any weights."""

    folder: Path
    config: dict[str, Any]
    model_type: str
    architectures: tuple[str, ...]
    kind: ModelKind
    weights: tuple[Path, ...]  # *.safetensors, or pickle files when only those exist (allowed)
    pickle: bool
    tokenizer_files: tuple[Path, ...]

    @property
    def architecture(self) -> str:
        return self.architectures[0] if self.architectures else self.model_type


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _kind(model_type: str, architectures: tuple[str, ...], folder: Path) -> ModelKind:
    kind = _KINDS.get(model_type)
    if kind == "llm" or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "llm"
    if kind is None:
        found = f"architectures {list(architectures)}" if architectures else "no 'architectures'"
        encoders = ", ".join(t for t, k in _KINDS.items() if k == "encoder")
        raise ModelError(f"model {folder}: unknown architecture ({found}, model_type "
                         f"{model_type or 'missing'!r}); supported encoders: {encoders[:60]}..., plus common "
                         "decoders and CNNs; export it to ONNX yourself otherwise")
    return "other" if kind == "encoder" and any(_HEAD.search(a) for a in architectures) else kind


def _json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"model {path.parent}: {path.name} is not valid JSON ({_one_line(exc)}); "
                         "re-save it") from exc
    if not isinstance(doc, dict):
        raise ModelError(f"model {path.parent}: {path.name} is not a JSON object; re-save it")
    return doc


def inspect_checkpoint(folder: str | Path, *, allow_pickle: bool = False) -> Checkpoint:
    """Describe a checkpoint folder; ``ModelError`` (one line) when it cannot be used."""
    root = Path(folder)
    if not (root / "config.json").is_file():
        raise ModelError(f"model {root}: no config.json; pass a Hugging Face checkpoint folder or .onnx file")
    config = _json(root / "config.json")
    archs, model_type = config.get("architectures") or (), config.get("model_type") or ""
    if not isinstance(archs, list | tuple) or not all(isinstance(a, str) for a in archs):
        raise ModelError(f"model {root}: config.json 'architectures' is {archs!r}, expected a list of names")
    if not isinstance(model_type, str):
        raise ModelError(f"model {root}: config.json 'model_type' is {model_type!r}, expected a name")
    if not archs and not model_type:
        raise ModelError(f"model {root}: config.json names no architecture (no 'architectures', no "
                         "'model_type'); save the model with save_pretrained")
    kind = _kind(model_type, tuple(archs), root)
    files = sorted(p for p in root.iterdir() if p.is_file())
    safetensors = tuple(p for p in files if p.suffix == ".safetensors")
    pickles = tuple(p for p in files if p.suffix in PICKLE_SUFFIXES and not _NOT_WEIGHTS.match(p.name))
    tokenizer = tuple(root / n for n in TOKENIZER_FILES if (root / n).is_file())
    if not safetensors and pickles and not allow_pickle:
        raise ModelError(
            f"model {root}: only pickle weights ({', '.join(p.name for p in pickles)}); pickle checkpoints "
            "are refused because loading them can run code: convert them to safetensors (safetensors.torch."
            "save_file(torch.load(f, weights_only=True), 'model.safetensors')) or pass allow_pickle=True"
        )
    if not safetensors and not pickles:
        raise ModelError(f"model {root}: no weights (no *.safetensors file); save the model with "
                         "save_pretrained(..., safe_serialization=True) into this folder")
    if not safetensors:
        log.warning("%s: loading pickle weights with torch.load(weights_only=True) as asked", root)
    return Checkpoint(root, config, model_type, tuple(archs), kind, safetensors or pickles, not safetensors,
                      tokenizer)


def safetensors_params(path: str | Path) -> int:
    """Number of floating-point parameters in a .safetensors file, from its JSON header alone."""
    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 <= length <= min(size - 8, _MAX_HEADER_BYTES):
            raise ModelError(f"model weights {p}: corrupt safetensors header (length {length}); re-save it")
        raw = f.read(length)
    total = 0
    try:
        for name, info in json.loads(raw).items():
            if name == "__metadata__":
                continue
            dims = [int(d) for d in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
            if min(dims, default=0) < 0 or not 0 <= begin <= end <= size - 8 - length:
                raise ModelError(f"model weights {p}: tensor {name!r} lies outside the file (truncated?); "
                                 "re-save it")
            total += math.prod(dims) if info["dtype"] in _FLOAT_DTYPES else 0
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelError(f"model weights {p}: corrupt safetensors header ({_one_line(exc)}); "
                         "re-save it") from exc
    return total


def _pickle_state(path: Path) -> dict[str, Any]:
    try:
        import torch
    except ImportError as exc:
        raise BackendUnavailable("huggingface", "hf", "missing: torch") from exc
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # UnpicklingError for anything beyond plain tensors, or a corrupt file
        raise ModelError(f"model weights {path}: cannot be loaded with weights_only=True "
                         f"({_one_line(exc)})") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # Lightning-style checkpoints
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"model weights {path}: not a state dict of tensors; save model.state_dict()")
    return state


def _ref(ck: Checkpoint) -> ModelRef:
    files = sorted([*ck.weights, ck.folder / "config.json"], key=lambda p: p.name)
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{file_sha256(f)}\n".encode())
    size = sum(f.stat().st_size for f in files)
    return ModelRef(path=str(ck.folder.resolve()), format="hf", sha256=h.hexdigest(), size_bytes=size)


def _signature(ck: Checkpoint) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    cfg, seq2 = ck.config, ("batch", "sequence")
    if ck.kind == "encoder":
        tok_config = ck.folder / "tokenizer_config.json"
        try:
            names = _json(tok_config).get("model_input_names") if tok_config.is_file() else None
        except ModelError:
            names = None
        if not (isinstance(names, list) and set(names) <= set(TEXT_INPUTS) and "input_ids" in names):
            names = [n for n in TEXT_INPUTS if n != "token_type_ids" or ck.model_type not in _NO_TOKEN_TYPES]
        hidden = cfg.get("hidden_size") or cfg.get("dim") or cfg.get("d_model") or "hidden"
        return (tuple(TensorSpec(name=n, dtype="int64", shape=seq2) for n in TEXT_INPUTS if n in names),
                (TensorSpec(name=OUTPUT_NAME, dtype="float32", shape=(*seq2, hidden)),))
    if ck.kind == "llm":
        vocab = cfg.get("vocab_size") or "vocab"
        return (tuple(TensorSpec(name=n, dtype="int64", shape=seq2) for n in ("input_ids", "attention_mask")),
                (TensorSpec(name="logits", dtype="float32", shape=(*seq2, vocab)),))
    return (), ()  # CNNs and the rest: their signature is known once exported


def _params(ck: Checkpoint) -> int:
    if ck.pickle:
        return sum(int(t.numel()) for f in ck.weights for t in _pickle_state(f).values()
                   if t.is_floating_point())
    return sum(safetensors_params(f) for f in ck.weights)


def assess_hf(folder: str | Path, *, allow_pickle: bool = False) -> Assessment:
    """Assess a Hugging Face checkpoint folder; ``ModelError`` with one line on any problem."""
    ck = inspect_checkpoint(folder, allow_pickle=allow_pickle)
    params = _params(ck)
    inputs, outputs = _signature(ck)
    version = ck.config.get("transformers_version")
    llm = None
    if ck.kind == "llm":
        from edgeopt.intake.llm import llm_info_hf

        llm = llm_info_hf(ck.folder, ck.config, ck.model_type, ck.architecture)
    assessment = Assessment(model=_ref(ck), kind=ck.kind, params=params, inputs=inputs, outputs=outputs,
                            producer=f"transformers {version}" if version else "transformers",
                            op_histogram={ck.architecture: 1}, llm=llm)
    log.info("assessed %s: %s %s, %d params", ck.folder.name, ck.kind, ck.architecture, params)
    return assessment


def _import_hf():
    """torch, transformers, onnx and onnxruntime, or ``BackendUnavailable`` naming the extra."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub: everything is local
    try:
        import onnx
        import onnxruntime
        import torch
        import transformers
    except ImportError as exc:
        raise BackendUnavailable("huggingface", "hf", f"missing: {exc.name}") from exc
    return torch, transformers, onnx, onnxruntime


@contextmanager
def quiet_transformers(transformers) -> Iterator[None]:
    """Silence transformers' load reports, progress bars and the exporter's warnings, then restore."""
    tl = transformers.utils.logging
    verbosity, bars = tl.get_verbosity(), tl.is_progress_bar_enabled()
    tl.set_verbosity_error()
    tl.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        tl.set_verbosity(verbosity)
        if bars:
            tl.enable_progress_bar()


def _load(ck: Checkpoint, tmp: Path, torch, transformers):
    src = ck.folder
    if ck.pickle:  # convert to safetensors in the temp folder, so transformers never unpickles
        from safetensors.torch import save_file

        src = tmp / "hf-from-pickle"
        src.mkdir()
        state = {k: v.detach().contiguous().clone() for f in ck.weights for k, v in _pickle_state(f).items()}
        save_file(state, str(src / "model.safetensors"))
        shutil.copy2(ck.folder / "config.json", src / "config.json")
    try:
        model = transformers.AutoModel.from_pretrained(str(src), local_files_only=True, use_safetensors=True,
                                                       attn_implementation="eager", dtype=torch.float32)
    except Exception as exc:
        raise ModelError(f"model {ck.folder}: transformers cannot load it ({_one_line(exc)})") from exc
    return model.eval()


def _feeds(names: list[str], *, vocab: int, pad_id: int, batch: int, length: int) -> dict[str, np.ndarray]:
    """Random token ids; every row after the first is padded at its end, by more for each row."""
    ids = np.random.default_rng(batch).integers(1, max(vocab, 2), (batch, length), dtype=np.int64)
    mask = np.ones((batch, length), dtype=np.int64)
    for row in range(1, batch):
        mask[row, max(1, length - row * length // (batch + 1)):] = 0
    ids[mask == 0] = pad_id
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return {n: feeds[n] for n in names}


def _wrapper(torch, model, names: list[str], *, additive_mask: bool):
    """A module taking the inputs positionally and returning ``last_hidden_state``.

    ``additive_mask`` passes the attention mask as a 4-D float bias (0 / float32 min), which
    transformers 5 uses as is: its 2-D mask preparation does not trace with the TorchScript exporter.
    """

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args):
            kw = dict(zip(names, args, strict=True))
            if additive_mask and "attention_mask" in kw:
                m = kw["attention_mask"][:, None, None, :].to(torch.float32)
                kw["attention_mask"] = (1.0 - m) * torch.finfo(torch.float32).min
            return self.model(**kw, return_dict=True).last_hidden_state

    return Encoder().eval()  # eval: the exporter restores the wrapper's mode, and with it the model's


def _max_diff(run, model, torch, samples: list[dict[str, np.ndarray]]) -> float:
    worst = 0.0
    for feeds in samples:
        got = run(feeds)
        with torch.no_grad():
            want = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
        if got.shape != want.shape or got.dtype != np.float32:
            raise ModelError(f"exported output is {got.dtype}{list(got.shape)}, torch's float32"
                             f"{list(want.shape)}")
        worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - want))))
    return worst


def _export_once(model, names: list[str], path: Path, *, seq_len: int | None, opset: int,
                 additive_mask: bool, samples: list[dict[str, np.ndarray]], libs) -> float:
    """Export with one way of passing the mask; the max abs diff of onnxruntime vs torch."""
    torch, _, onnx, ort = libs
    wrapper = _wrapper(torch, model, names, additive_mask=additive_mask)
    eager = _max_diff(lambda f: wrapper(*(torch.from_numpy(f[n]) for n in names)).detach().numpy(),
                      model, torch, samples)
    if eager > MAX_ABS_DIFF:  # not worth exporting
        raise ModelError(f"the {'4-D' if additive_mask else '2-D'} mask changes the outputs by {eager:.2e}")
    axes = {0: "batch"} if seq_len else {0: "batch", 1: "sequence"}
    with torch.no_grad():
        torch.onnx.export(wrapper, tuple(torch.from_numpy(samples[0][n]) for n in names), str(path),
                          dynamo=False, input_names=names, output_names=[OUTPUT_NAME], opset_version=opset,
                          dynamic_axes={n: dict(axes) for n in [*names, OUTPUT_NAME]})
    proto = onnx.load(str(path))
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    return _max_diff(lambda f: sess.run([OUTPUT_NAME], f)[0], model, torch, samples)


def export_onnx(folder: str | Path, *, out_dir: str | Path, seq_len: int | None = None, opset: int = 17,
                allow_pickle: bool = False) -> Path:
    """Export the encoder checkpoint in ``folder`` to ``out_dir/model.onnx``; return that path.

    The batch axis is dynamic (``batch``), and so is the sequence axis (``sequence``) unless
    ``seq_len`` fixes it. Files are built in a temporary folder inside ``out_dir`` and moved into
    place with ``os.replace``, ``model.onnx`` last: a complete ``model.onnx`` means a complete export.

    Raises ``ModelError`` (one line) for an unusable checkpoint, a failed export or an ONNX model
    that does not match torch (max abs diff >= 1e-3); ``ConfigError`` for a bad ``seq_len``;
    ``BackendUnavailable`` without torch, transformers, onnx or onnxruntime.
    """
    ck = inspect_checkpoint(folder, allow_pickle=allow_pickle)
    if ck.kind != "encoder":
        raise ModelError(f"model {ck.folder}: ONNX export supports encoder checkpoints (a BERT-like ...Model "
                         f"without a head) for now; this one is {ck.kind} ({ck.architecture})")
    max_pos = int(ck.config.get("max_position_embeddings") or 512)
    if seq_len is not None and not 1 <= seq_len <= max_pos:
        raise ConfigError(f"seq_len must be between 1 and {max_pos} (the model's positions), got {seq_len}")
    libs = torch, transformers, onnx, ort = _import_hf()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    start = time.perf_counter()
    try:
        with quiet_transformers(transformers):
            model = _load(ck, tmp, torch, transformers)
            names = [n for n in TEXT_INPUTS if n in inspect.signature(model.forward).parameters]
            vocab, pad = int(ck.config.get("vocab_size") or 100), int(ck.config.get("pad_token_id") or 0)
            samples = [_feeds(names, vocab=vocab, pad_id=pad, batch=b, length=seq_len or min(n, max_pos))
                       for b, n in ((2, 16), (3, 11))]
            errors: list[str] = []
            for additive in (True, False):
                try:
                    diff = _export_once(model, names, tmp / MODEL_FILE, seq_len=seq_len, opset=opset,
                                        additive_mask=additive, samples=samples, libs=libs)
                except Exception as exc:  # noqa: BLE001 - the exporter raises anything; try the next way
                    errors.append(_one_line(exc))
                    continue
                if diff < MAX_ABS_DIFF:
                    break
                errors.append(f"onnxruntime differs from torch by {diff:.2e} (limit {MAX_ABS_DIFF:.0e})")
            else:
                raise ModelError(f"model {ck.folder}: ONNX export failed ({'; '.join(errors)})")
        info = {
            "source": str(ck.folder.resolve()), "source_sha256": _ref(ck).sha256,
            "architecture": ck.architecture, "model_type": ck.model_type, "params": _params(ck),
            "inputs": names, "output": OUTPUT_NAME, "seq_len": seq_len, "opset": opset,
            "ir_version": MAX_IR_VERSION, "pickle_source": ck.pickle, "max_abs_diff_vs_torch": diff,
            "attention_mask": "additive-4d" if additive else "2d",
            "export_seconds": round(time.perf_counter() - start, 3),
            **{k: ck.config.get(k) for k in ("hidden_size", "num_attention_heads", "num_hidden_layers")},
            "tokenizer_files": [f.name for f in ck.tokenizer_files],
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "onnx": onnx.__version__, "onnxruntime": ort.__version__},
        }
        for f in ck.tokenizer_files:
            shutil.copy2(f, tmp / f.name)
        (tmp / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        for f in sorted(tmp.iterdir(), key=lambda p: p.name == MODEL_FILE):
            if f.is_file():
                os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not ck.tokenizer_files:
        log.warning("%s: no tokenizer files to copy beside the ONNX model", ck.folder)
    log.info("exported %s to %s in %.1f s (%s mask, max abs diff vs torch %.2e)", ck.folder.name,
             out / MODEL_FILE, info["export_seconds"], info["attention_mask"], diff)
    return out / MODEL_FILE
