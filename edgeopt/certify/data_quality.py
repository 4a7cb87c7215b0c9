"""Data-quality check: Great Expectations suites over the calibration and evaluation data.

Tensors are not tables, so each sample becomes one row of summary columns. Per model input ``x``:
``x__mean``, ``x__std``, ``x__min``, ``x__max`` (over the sample's finite values), ``x__nonfinite`` (its
NaN and inf count), ``x__shape`` (the per-sample shape, e.g. ``[1,8,8]``), ``x__dtype`` and ``x__hash``;
plus ``row_hash`` (every input of the sample) and ``label`` when the data has labels.

One suite per data set, built from the model's input signature:

    schema      the columns of exactly the signature's inputs; per input: dtype equal to the
                signature's, per-sample shape matching its static dims (dynamic dims: any size),
                present in every sample (inputs with different sample counts leave gaps)
    finite      no NaN or inf in any sample
    range       (evaluation, with calibration data) each sample's min and max within the calibration
                set's observed range widened by ``range_margin`` × its width on each side
    unique      no duplicate samples (sha256 of each sample's inputs)
    count       at least ``min_samples`` samples
    labels      (when present) one non-negative class per sample

and, with calibration data, a shift suite: per input, the two-sample Kolmogorov–Smirnov test of the
calibration against the evaluation per-sample means and per-sample standard deviations; a shift is a
difference both significant (p < ``shift_alpha`` / the number of tests, Bonferroni) and large
(KS statistic D ≥ ``shift_d_min``). Great Expectations evaluates every expectation (ephemeral
context, a pandas data frame batch); a failed expectation fails the check, named with its data set.
Each suite's validation result is written as JSON into ``out_dir``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeopt.certify.records import CheckResult
from edgeopt.data import Dataset
from edgeopt.errors import BackendUnavailable
from edgeopt.records import TensorSpec

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["CHECK", "check", "expectations", "sample_frame", "shift_frame"]

log = logging.getLogger(__name__)

CHECK = "data-quality"
#: one expectation: (Great Expectations class name, its keyword arguments, what it says in words); the
#: argument ``where=(column, minimum)`` keeps only the rows where that column is at least the minimum
Spec = tuple[str, dict[str, Any], str]
#: unexpected values and rows listed per failed expectation in the evidence
_LISTED = 10


# ------------------------------------------------------------------------------ tensors → tables
def _shape_text(dims: tuple[int, ...] | tuple[int | str, ...]) -> str:
    return "[" + ",".join(str(d) for d in dims) + "]"


def _shape_regex(spec: TensorSpec) -> str:
    dims = [str(d) if isinstance(d, int) and d > 0 else r"\d+" for d in spec.shape[1:]]
    return r"^\[" + ",".join(dims) + r"\]$"


def _pandas() -> Any:
    """pandas, which comes with the ``certify`` extra (Great Expectations depends on it)."""
    try:
        import pandas
    except ImportError as exc:
        raise BackendUnavailable("great-expectations", "certify",
                                 f"the data-quality check builds pandas tables: {exc}") from exc
    return pandas


def sample_frame(data: Dataset) -> pd.DataFrame:
    """One row per sample: the summary columns of every input of ``data`` (see the module doc)."""
    pd = _pandas()
    columns: dict[str, pd.Series] = {}
    hashes: list[list[str]] = []
    for name, arr in data.inputs.items():
        n = arr.shape[0]
        flat = arr.reshape(n, -1)
        numeric = np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_
        # strings or objects: no figures (NaN), only the schema and hash columns
        values = flat.astype(np.float64) if numeric else np.full((n, 1), np.nan)
        finite = np.isfinite(values)
        count = finite.sum(axis=1)
        some = count > 0
        safe = np.where(finite, values, 0.0)
        mean = np.where(some, safe.sum(axis=1) / np.maximum(count, 1), np.nan)
        var = np.where(finite, (safe - mean[:, None]) ** 2, 0.0).sum(axis=1) / np.maximum(count, 1)
        columns[f"{name}__mean"] = pd.Series(mean)
        columns[f"{name}__std"] = pd.Series(np.where(some, np.sqrt(var), np.nan))
        columns[f"{name}__min"] = pd.Series(np.where(some, np.where(finite, values, np.inf).min(axis=1), np.nan))
        columns[f"{name}__max"] = pd.Series(np.where(some, np.where(finite, values, -np.inf).max(axis=1), np.nan))
        columns[f"{name}__nonfinite"] = pd.Series(values.shape[1] - count if numeric else np.zeros(n, np.int64))
        columns[f"{name}__shape"] = pd.Series([_shape_text(arr.shape[1:])] * n)
        columns[f"{name}__dtype"] = pd.Series([str(arr.dtype)] * n)
        digests = [hashlib.sha256(np.ascontiguousarray(arr[i]).tobytes()).hexdigest() for i in range(n)]
        columns[f"{name}__hash"] = pd.Series([d[:16] for d in digests])
        hashes.append(digests)
    rows = max((len(h) for h in hashes), default=0)
    row_hash = [hashlib.sha256("".join(h[i] if i < len(h) else "-" for h in hashes).encode()).hexdigest()[:16]
                for i in range(rows)]
    columns["row_hash"] = pd.Series(row_hash, dtype=object)
    if data.labels is not None:
        columns["label"] = pd.Series(np.asarray(data.labels).reshape(len(data.labels), -1)[:, 0])
    return pd.DataFrame(columns)


def _ks(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    from scipy.stats import ks_2samp

    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if a.size == 0 or b.size == 0:
        return float("nan"), float("nan")
    res = ks_2samp(a, b)
    return float(res.statistic), float(res.pvalue)


def shift_frame(calibration: pd.DataFrame, evaluation: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """One row per (input, per-sample statistic): the two-sample KS statistic ``ks_d`` and its ``p_value``."""
    pd = _pandas()
    rows = []
    for name in names:
        for stat in ("mean", "std"):
            col = f"{name}__{stat}"
            if col not in calibration or col not in evaluation:
                continue
            d, p = _ks(calibration[col].to_numpy(float), evaluation[col].to_numpy(float))
            if np.isfinite(d):
                rows.append({"input": name, "statistic": f"per-sample {stat}", "ks_d": d, "p_value": p,
                             "n_calibration": int(calibration[col].notna().sum()),
                             "n_evaluation": int(evaluation[col].notna().sum())})
    return pd.DataFrame(rows, columns=["input", "statistic", "ks_d", "p_value", "n_calibration", "n_evaluation"])


# --------------------------------------------------------------------------------------- suites
def _range(calibration: pd.DataFrame, name: str, margin: float) -> tuple[float, float] | None:
    lo, hi = calibration.get(f"{name}__min"), calibration.get(f"{name}__max")
    if lo is None or hi is None or lo.notna().sum() == 0:
        return None
    low, high = float(lo.min()), float(hi.max())
    width = high - low
    return low - margin * width, high + margin * width


def expectations(*, signature: tuple[TensorSpec, ...], frame: pd.DataFrame, role: str, min_samples: int,
                 value_range: dict[str, tuple[float, float]] | None = None) -> list[Spec]:
    """The suite of one data set: (expectation class, arguments, description), in the module doc's order."""
    names = [s.name for s in signature]
    expected = [f"{n}__{c}" for n in names for c in ("mean", "std", "min", "max", "nonfinite", "shape", "dtype",
                                                      "hash")] + ["row_hash"] + (["label"] if "label" in frame else [])
    specs: list[Spec] = [("ExpectTableColumnsToMatchSet", {"column_set": expected, "exact_match": True},
                          f"{role}: arrays are exactly the model inputs {names}")]
    for s in signature:
        n = s.name
        specs += [
            ("ExpectColumnValuesToBeInSet", {"column": f"{n}__dtype", "value_set": [s.dtype]},
             f"{role}: '{n}' has dtype {s.dtype}"),
            ("ExpectColumnValuesToMatchRegex", {"column": f"{n}__shape", "regex": _shape_regex(s)},
             f"{role}: '{n}' per-sample shape matches {_shape_text(s.shape[1:])}"),
            ("ExpectColumnValuesToNotBeNull", {"column": f"{n}__hash"}, f"{role}: every sample has '{n}'"),
            ("ExpectColumnValuesToBeBetween", {"column": f"{n}__nonfinite", "min_value": 0, "max_value": 0},
             f"{role}: '{n}' has no NaN or inf"),
        ]
        if value_range and n in value_range:
            lo, hi = value_range[n]
            specs += [
                ("ExpectColumnValuesToBeBetween", {"column": f"{n}__min", "min_value": lo},
                 f"{role}: '{n}' values >= {lo:.6g} (calibration range widened)"),
                ("ExpectColumnValuesToBeBetween", {"column": f"{n}__max", "max_value": hi},
                 f"{role}: '{n}' values <= {hi:.6g} (calibration range widened)"),
            ]
    specs += [
        ("ExpectColumnValuesToBeUnique", {"column": "row_hash"}, f"{role}: no duplicate samples"),
        ("ExpectTableRowCountToBeBetween", {"min_value": min_samples}, f"{role}: at least {min_samples} samples"),
    ]
    if "label" in frame:
        specs += [("ExpectColumnValuesToNotBeNull", {"column": "label"}, f"{role}: one label per sample"),
                  ("ExpectColumnValuesToBeBetween", {"column": "label", "min_value": 0},
                   f"{role}: labels are class ids >= 0")]
    return specs


def _shift_specs(*, tests: int, alpha: float, d_min: float) -> list[Spec]:
    per_test = alpha / max(tests, 1)
    return [("ExpectColumnValuesToBeBetween",
             {"column": "p_value", "min_value": per_test, "where": ("ks_d", d_min)},
             (f"shift: no calibration-vs-evaluation difference with KS D >= {d_min:g} and p < {per_test:.3g} "
              f"({alpha:g} / {tests} tests)"))]


# ------------------------------------------------------------------------------ Great Expectations
@contextmanager
def _quiet() -> Iterator[None]:
    """Great Expectations' INFO chatter and its own deprecation warnings off; its warnings and errors stay."""
    with warnings.catch_warnings(), contextlib.suppress(ImportError):  # missing: _validate says what to install
        warnings.simplefilter("ignore")
        import great_expectations  # noqa: F401 - its modules create their loggers at import (some set to INFO)

    loggers = [logging.getLogger("great_expectations")] + [
        logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.startswith("great_expectations.")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        if lg.level == logging.NOTSET or lg.level < logging.WARNING:
            lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
                warnings.filterwarnings("ignore", category=category, module=r"great_expectations(\.|$)")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _validate(suites: dict[str, tuple[pd.DataFrame, list[Spec]]]) -> tuple[dict[str, dict[str, Any]], str]:
    """Each suite validated on its frame → (JSON-able validation results by suite, GE version)."""
    with _quiet():
        try:
            import great_expectations as gx
            from great_expectations.data_context.types.base import ProgressBarsConfig
            from great_expectations.expectations.row_conditions import Column
        except ImportError as exc:
            raise BackendUnavailable("great-expectations", "certify",
                                     f"the data-quality check runs Great Expectations: {exc}") from exc
        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        source = context.data_sources.add_pandas("edgeopt-certify")
        results = {}
        for name, (frame, specs) in suites.items():
            asset = source.add_dataframe_asset(name=name)
            batch = asset.add_batch_definition_whole_dataframe("all").get_batch(
                batch_parameters={"dataframe": frame})
            suite = gx.ExpectationSuite(name=f"edgeopt-{name}", expectations=[
                getattr(gx.expectations, cls)(**_ge_kwargs(kwargs, Column), description=text)
                for cls, kwargs, text in specs])
            results[name] = batch.validate(suite, result_format="SUMMARY").to_json_dict()
    return results, str(gx.__version__)


def _ge_kwargs(kwargs: dict[str, Any], column: Any) -> dict[str, Any]:
    """A spec's arguments for Great Expectations: ``where=(column, minimum)`` becomes a row condition."""
    out = dict(kwargs)
    if "where" in out:
        name, minimum = out.pop("where")
        out["row_condition"] = column(name) >= minimum
    return out


def _exception(result: dict[str, Any]) -> str | None:
    info = result.get("exception_info") or {}
    found = [info] if "raised_exception" in info else list(info.values())
    messages = [str(i.get("exception_message")) for i in found if isinstance(i, dict) and i.get("raised_exception")]
    return "; ".join(dict.fromkeys(messages)) or None


def _failures(validation: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for r in validation.get("results", []):
        if r.get("success"):
            continue
        cfg, res = r.get("expectation_config", {}), r.get("result") or {}
        entry = {"expectation": cfg.get("type"), "description": cfg.get("description"),
                 "column": cfg.get("kwargs", {}).get("column")}
        for key in ("observed_value", "element_count", "unexpected_count"):
            if key in res:
                entry[key] = res[key]
        for key in ("partial_unexpected_list", "partial_unexpected_index_list"):
            if key in res:  # the first few; the suite's JSON file has the rest
                entry[key] = list(res[key])[:_LISTED]
        error = _exception(r)
        if error:
            entry["error"] = error
        out.append(entry)
    return out


def _describe(failure: dict[str, Any]) -> str:
    text = str(failure.get("description") or failure.get("expectation"))
    if failure.get("error"):
        return f"{text} (error: {failure['error']})"
    if "unexpected_count" in failure:
        return f"{text} (fails on {failure['unexpected_count']} of {failure.get('element_count', '?')} rows)"
    if "observed_value" in failure:
        return f"{text} (observed {failure['observed_value']})"
    return text


# ----------------------------------------------------------------------------------------- check
def check(*, signature: tuple[TensorSpec, ...], evaluation: Dataset, calibration: Dataset | None, out_dir: Path,
          min_samples: int = 30, range_margin: float = 0.1, shift_alpha: float = 0.01,
          shift_d_min: float = 0.1) -> CheckResult:
    """Validate the evaluation (and calibration) data against the model's inputs (see the module doc)."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [s.name for s in signature]
    frames = {"evaluation": sample_frame(evaluation)}
    if calibration is not None:
        frames["calibration"] = sample_frame(calibration)
    ranges: dict[str, tuple[float, float]] = {}
    if calibration is not None:
        ranges = {n: r for n in names if (r := _range(frames["calibration"], n, range_margin)) is not None}
    suites = {role: (frame, expectations(signature=signature, frame=frame, role=role, min_samples=min_samples,
                                         value_range=ranges if role == "evaluation" else None))
              for role, frame in frames.items()}
    shift = None
    if calibration is not None:
        shift = shift_frame(frames["calibration"], frames["evaluation"], names)
        if len(shift):
            suites["shift"] = (shift, _shift_specs(tests=len(shift), alpha=shift_alpha, d_min=shift_d_min))

    results, ge_version = _validate(suites)
    files = []
    for role, frame in frames.items():
        path = out_dir / f"data-quality-{role}-samples.csv"
        frame.to_csv(path, index_label="sample")
        files.append(str(path))
    for name, validation in results.items():
        path = out_dir / f"data-quality-{name}.json"
        path.write_text(json.dumps(validation, indent=1, default=str), encoding="utf-8")
        files.append(str(path))

    failures = {name: _failures(v) for name, v in results.items()}
    met = {name: f"{len(v['results']) - len(failures[name])}/{len(v['results'])}" for name, v in results.items()}
    failed = [_describe(f) for name in results for f in failures[name] if name != "shift"]
    if failures.get("shift") and shift is not None:
        per_test = shift_alpha / max(len(shift), 1)
        moved = shift[(shift["ks_d"] >= shift_d_min) & (shift["p_value"] < per_test)]
        failed += [f"shift: '{r.input}' {r.statistic} differs between calibration and evaluation "
                   f"(KS D {r.ks_d:.3f} >= {shift_d_min:g}, p {r.p_value:.2g} < {per_test:.2g})"
                   for r in moved.itertuples()] or [_describe(f) for f in failures["shift"]]
    shift_rows = [] if shift is None else shift.to_dict(orient="records")
    max_d = max((r["ks_d"] for r in shift_rows), default=float("nan"))
    shift_text = (f"shift: max KS D {max_d:.3f} over {len(shift_rows)} tests (a shift is D >= {shift_d_min:g} "
                  f"with p < {shift_alpha:g}/{len(shift_rows)})" if shift_rows
                  else "shift: not tested (no calibration data)")
    counts = ", ".join(f"{role} {len(frame)} samples ({met[role]} expectations met)" for role, frame in frames.items())
    summary = f"data quality: {counts}; {shift_text}"
    status = "fail" if failed else "pass"
    reason = None
    if failed:
        reason = f"{len(failed)} expectation(s) failed: " + "; ".join(failed)
    evidence = {
        "great_expectations": ge_version,
        "samples": {role: len(frame) for role, frame in frames.items()},
        "suites": {name: {"success": bool(v.get("success")), "expectations": len(v["results"]),
                          "failed": failures[name]} for name, v in results.items()},
        "value_range": {n: list(r) for n, r in ranges.items()},
        "shift": {"statistic": "two-sample Kolmogorov-Smirnov on per-sample means and standard deviations",
                  "alpha": shift_alpha, "bonferroni_tests": len(shift_rows), "d_min": shift_d_min,
                  "tests": shift_rows} if calibration is not None else None,
        "settings": {"min_samples": min_samples, "range_margin": range_margin,
                     "range_rule": "calibration [min, max] widened by range_margin x its width on each side"},
    }
    duration = time.perf_counter() - start
    log.info("%s %s: %s (%.1f s)", CHECK, status, reason or summary, duration)
    return CheckResult(check=CHECK, status=status, summary=summary, reason=reason,
                       evidence=json.loads(json.dumps(evidence, default=_json_default)), files=tuple(files),
                       duration_s=duration)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
