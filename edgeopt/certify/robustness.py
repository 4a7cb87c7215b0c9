"""Robustness check: the candidate against its baseline on perturbed and edge inputs.

From a seeded sample of ``samples`` evaluation rows, five input sets (each written as ``.npz`` into
``out_dir``):

    clean       the rows as they are (the reference for stability; not gated)
    noise       each float input plus Gaussian noise of standard deviation ``noise_level`` × that
                input's standard deviation over the evaluation set
    zeros       each float input all zeros
    range-min   each float input filled with its smallest value in the calibration set (the
                evaluation set when there is no calibration data)
    range-max   each float input filled with its largest value there

Integer inputs (token ids, attention masks, ...) keep their clean values in every set: noise does
not apply to them, and edge values of token ids are not synthesized (an all-padding or
out-of-vocabulary sequence is not a valid input for every model). A model with integer inputs only
has nothing to perturb: the check is not applicable.

The candidate and the baseline each run every set in a fresh supervised process (``bench.infer``:
all sets in one run; when it fails, each set alone, to tell which sets fail). Per set: agreement
with the baseline under the same perturbation (top-1 agreement, or for encoders the mean cosine of
the mean-pooled embeddings: ``accuracy.per_sample_agreement``) and whether the candidate's outputs
are finite; for ``noise`` also the stability of each model (its noisy outputs against its own clean
ones; reported, not gated). The check passes when every perturbed set's agreement is at least
``agreement_min`` and the candidate's outputs are finite (and it runs) on every set. A set the
baseline cannot run (or gives non-finite outputs on) has no agreement; the candidate's finiteness
is still judged there.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgeopt import bench
from edgeopt.certify.accuracy import per_sample_agreement
from edgeopt.certify.records import CheckResult
from edgeopt.data import Dataset
from edgeopt.errors import CandidateFailed
from edgeopt.evaluate.fidelity import load_outputs
from edgeopt.records import Artifact, TensorSpec

__all__ = ["CHECK", "PERTURBED", "SEED", "check", "input_sets"]

log = logging.getLogger(__name__)

CHECK = "robustness"
SEED = 20261210
#: the gated sets, in order (``clean`` is the reference)
PERTURBED = ("noise", "zeros", "range-min", "range-max")
_INTEGER_REASON = ("integer input (token ids, masks): not perturbed; noise does not apply and edge token ids "
                   "are not synthesized (not a valid input for every model)")


def input_sets(*, evaluation: Dataset, calibration: Dataset | None, noise_level: float, samples: int,
               seed: int = SEED) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """The five input sets of the module doc, and how they were made (JSON-able)."""
    rng = np.random.default_rng(seed)
    n = evaluation.count
    rows = np.sort(rng.choice(n, size=min(samples, n), replace=False))
    clean = {name: arr[rows] for name, arr in evaluation.inputs.items()}
    floats = [name for name, arr in clean.items() if np.issubdtype(arr.dtype, np.floating)]
    source = calibration if calibration is not None else evaluation
    sigma = {name: noise_level * float(np.std(evaluation.inputs[name], dtype=np.float64)) for name in floats}
    bounds = {name: (float(np.min(source.inputs[name])), float(np.max(source.inputs[name]))) for name in floats}

    def with_floats(make: Any) -> dict[str, np.ndarray]:
        return {name: make(name, arr).astype(arr.dtype) if name in floats else arr for name, arr in clean.items()}

    sets = {
        "clean": clean,
        "noise": with_floats(lambda name, arr: arr + rng.normal(0.0, sigma[name], arr.shape)),
        "zeros": with_floats(lambda name, arr: np.zeros_like(arr)),
        "range-min": with_floats(lambda name, arr: np.full(arr.shape, bounds[name][0])),
        "range-max": with_floats(lambda name, arr: np.full(arr.shape, bounds[name][1])),
    }
    how = {
        "rows": rows.tolist(), "seed": seed, "perturbed_inputs": floats,
        "inputs_not_perturbed": {name: _INTEGER_REASON for name in clean if name not in floats},
        "noise_sigma": sigma, "noise_rule": f"Gaussian, sigma = {noise_level:g} x the input's std over the "
                                            "evaluation set",
        "range_source": "calibration" if calibration is not None else "evaluation (no calibration data)",
        "range": {name: list(b) for name, b in bounds.items()},
    }
    return sets, how


def _run(art: Artifact, *, who: str, signature: tuple[TensorSpec, ...], paths: dict[str, Path], combined: Path,
         spans: dict[str, tuple[int, int]], out_dir: Path) -> dict[str, np.ndarray | CandidateFailed]:
    """First outputs of ``art`` per set, or the failure of that set's run."""
    try:
        path = bench.infer(artifact=art, signature=signature, out_path=out_dir / f"robustness-{who}-outputs.npz",
                           data_path=str(combined))
        out = load_outputs(path)
        return {name: out[a:b] for name, (a, b) in spans.items()}
    except CandidateFailed as exc:
        log.info("%s: %s failed on the combined sets (%s: %s); running each set alone", CHECK, who, exc.reason, exc)
    results: dict[str, np.ndarray | CandidateFailed] = {}
    for name, data in paths.items():
        try:
            path = bench.infer(artifact=art, signature=signature, data_path=str(data),
                               out_path=out_dir / f"robustness-{who}-{name}-outputs.npz")
            results[name] = load_outputs(path)
        except CandidateFailed as exc:
            results[name] = exc
    return results


def _agreement(kind: str, cand: np.ndarray, base: np.ndarray, mask: np.ndarray | None) -> tuple[str, float]:
    metric, scores = per_sample_agreement(kind=kind, outputs=cand, baseline_outputs=base, attention_mask=mask)
    return metric, float(np.mean(scores))


def _judge(name: str, *, kind: str, agreement_min: float, sets: dict[str, dict[str, np.ndarray]],
           cand: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """One set's figures and status (pass / fail / reference / not-applicable) with its reason."""
    c, b = cand[name], base[name]
    mask = sets[name].get("attention_mask")
    entry: dict[str, Any] = {"rows": int(next(iter(sets[name].values())).shape[0])}
    if isinstance(c, CandidateFailed):
        entry["finite"] = False if c.reason == "accuracy" else None
        what = "outputs are not finite" if c.reason == "accuracy" else f"run failed ({c.reason})"
        also = " (the baseline's too)" if isinstance(b, CandidateFailed) and b.reason == c.reason else ""
        return entry | {"status": "fail", "reason": f"{name}: candidate {what}{also}: {c}"}
    entry["finite"] = True
    if isinstance(b, CandidateFailed):
        return entry | {"status": "not-applicable" if name != "clean" else "reference",
                        "reason": f"{name}: the baseline gives no usable outputs ({b.reason}: {b}); no agreement"}
    try:
        entry["metric"], entry["agreement"] = _agreement(kind, c, b, mask)
    except CandidateFailed as exc:
        return entry | {"status": "fail", "reason": f"{name}: outputs cannot be compared: {exc}"}
    if name == "noise":
        for who, outs in (("candidate", cand), ("baseline", base)):
            if not isinstance(outs["clean"], CandidateFailed):
                entry[f"stability_{who}"] = _agreement(kind, outs["noise"], outs["clean"], mask)[1]
    if name == "clean":
        return entry | {"status": "reference"}
    if entry["agreement"] >= agreement_min:
        return entry | {"status": "pass"}
    return entry | {"status": "fail", "reason": f"{name}: {entry['metric']} with the baseline "
                                                f"{entry['agreement']:.4f} < {agreement_min:g}"}


def check(*, artifact: Artifact, baseline: Artifact, signature: tuple[TensorSpec, ...], evaluation: Dataset,
          calibration: Dataset | None, kind: str, out_dir: Path, noise_level: float = 0.01, samples: int = 64,
          agreement_min: float = 0.95) -> CheckResult:
    """Agreement with the baseline and finite outputs on noisy and edge inputs (see the module doc)."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sets, how = input_sets(evaluation=evaluation, calibration=calibration, noise_level=noise_level, samples=samples)
    settings = {"noise_level": noise_level, "samples": samples, "agreement_min": agreement_min, "kind": kind}
    if not how["perturbed_inputs"]:
        reason = ("every model input is an integer input (token ids, masks): nothing to perturb with noise, and "
                  "edge token ids are not synthesized")
        log.info("%s not-applicable: %s", CHECK, reason)
        return CheckResult(check=CHECK, status="not-applicable", summary=f"robustness: not applicable ({reason})",
                           reason=reason, evidence=settings | {"inputs": how}, duration_s=time.perf_counter() - start)

    paths, spans, files, at = {}, {}, [], 0
    for name, data in sets.items():
        paths[name] = out_dir / f"robustness-{name}.npz"
        np.savez(paths[name], **data)
        files.append(str(paths[name]))
        count = int(next(iter(data.values())).shape[0])
        spans[name], at = (at, at + count), at + count
    combined = out_dir / "robustness-all-sets.npz"
    np.savez(combined, **{k: np.concatenate([sets[s][k] for s in sets]) for k in sets["clean"]})
    files.append(str(combined))

    outputs = {who: _run(art, who=who, signature=signature, paths=paths, combined=combined, spans=spans,
                         out_dir=out_dir) for who, art in (("candidate", artifact), ("baseline", baseline))}
    files += sorted(str(p) for p in out_dir.glob("robustness-*-outputs.npz"))
    judged = {name: _judge(name, kind=kind, agreement_min=agreement_min, sets=sets, cand=outputs["candidate"],
                           base=outputs["baseline"]) for name in sets}

    failed = [j["reason"] for j in judged.values() if j["status"] == "fail"]
    gated = [n for n in PERTURBED if judged[n]["status"] in ("pass", "fail") and "agreement" in judged[n]]
    metric = next((judged[n]["metric"] for n in sets if "metric" in judged[n]), "agreement")
    finite = sum(1 for j in judged.values() if j["finite"])
    noise = judged["noise"]
    stability = ", ".join(f"{w} {noise[f'stability_{w}']:.4f}" for w in ("candidate", "baseline")
                          if f"stability_{w}" in noise) or "not measured"
    compared = ", ".join(f"{n} {judged[n]['agreement']:.4f}" for n in gated) or "none of the perturbed sets"
    summary = (f"robustness: {metric} with the baseline {compared} (each >= {agreement_min:g}); candidate outputs "
               f"finite on {finite}/{len(sets)} sets; stability under noise (sigma {noise_level:g} x input std) "
               f"{stability}")
    status = "fail" if failed else "pass"
    if not failed and not gated:
        status = "not-applicable"
        failed_reason = "no perturbed set could be compared with the baseline: " + "; ".join(
            str(j.get("reason")) for n, j in judged.items() if n in PERTURBED)
    else:
        failed_reason = "; ".join(failed) if failed else None
    evidence = settings | {"metric": metric, "sets": judged, "inputs": how}
    duration = time.perf_counter() - start
    log.info("%s %s: %s (%.1f s)", CHECK, status, failed_reason or summary, duration)
    return CheckResult(check=CHECK, status=status, summary=summary, reason=failed_reason, evidence=evidence,
                       files=tuple(files), duration_s=duration)
