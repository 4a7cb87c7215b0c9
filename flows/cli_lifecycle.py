"""``edgeopt cross-validate | certify | approve | rollback | verify | nightly | drift``: a registered version's way to production.

Registered on the ``edgeopt`` app by ``flows.cli``. Each prints one line on bad input or a refused
step (exit 2) and exits 3 when the verdict is negative (not certified, not reproducible, tampered).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from edgeopt.errors import EdgeOptError
from flows.cli import _fail, app, out

Version = Annotated[str | None, typer.Option("--version", help="registered model version")]
Alias = Annotated[str | None, typer.Option("--alias", help="or an alias of it (e.g. candidate, champion)")]


def _run_flow(fn, verbose: bool, **kwargs):
    """Run a flow on the embedded API (or PREFECT_API_URL) with the optimize command's error handling."""
    from flows._env import PrefectAPIUnavailable, ensure_prefect_api

    try:
        ensure_prefect_api()
        return fn(**kwargs)
    except PrefectAPIUnavailable as exc:
        if verbose:
            import traceback

            sys.stderr.write("".join(traceback.format_exception(exc)))
        _fail(exc, PrefectAPIUnavailable.exit_code)
    except EdgeOptError as exc:
        _fail(exc)


def _check_name(model_name: str) -> None:
    """A registered model name names MLflow entries and report folders: checked before anything runs."""
    from edgeopt.names import check_name

    try:
        check_name(model_name, what="model name")
    except EdgeOptError as exc:
        _fail(exc)


def _need_one(version: str | None, alias: str | None) -> None:
    if (version is None) == (alias is None):
        _fail(EdgeOptError("give exactly one of --version N or --alias NAME"))


@app.command("cross-validate")
def cross_validate(
    model_name: Annotated[str, typer.Argument(help="registered model name, e.g. digits-resnet-intel-cpu")],
    version: Version = None,
    alias: Alias = None,
    eval_data: Annotated[Path | None, typer.Option("--eval", help="evaluation data (.npz)")] = None,
    rounds: Annotated[int, typer.Option(min=2, help="interleaved measuring rounds")] = 3,
    pool: Annotated[list[str] | None, typer.Option("--pool", help="fan out to this work pool (repeatable)")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show Prefect's logs")] = False,
) -> None:
    """Run a registered version on every runtime × device that can load it; re-measure it."""
    from flows._env import configure_embedded_defaults

    _check_name(model_name)
    _need_one(version, alias)
    configure_embedded_defaults(quiet=not verbose)
    from edgeopt.certify import crossval
    from flows.certify import cross_validate_flow

    rep = _run_flow(cross_validate_flow, verbose, model_name=model_name, version=version, alias=alias,
                    evaluation=str(eval_data.resolve()) if eval_data else None, rounds=rounds,
                    pools=list(pool or []) or None)
    for cv in rep.matrices:
        rows = crossval.matrix_rows(cv)
        table = Table(title=f"{model_name} version {cv.subject.version} on {cv.hardware.cpu_model}")
        for c in rows[0] if rows else []:
            table.add_column(c, justify="left" if c in ("runtime", "device", "status") else "right")
        for r in rows:
            table.add_row(*(str(v) for v in r.values()))
        out.print(table)
        out.print(f"{cv.verdict}: {cv.summary}", highlight=False, soft_wrap=True)
    if rep.verdict != "pass":
        raise typer.Exit(3)


@app.command()
def certify(
    model_name: Annotated[str, typer.Argument(help="registered model name")],
    version: Version = None,
    alias: Alias = None,
    eval_data: Annotated[Path | None, typer.Option("--eval", help="evaluation data (.npz, 'labels' for accuracy)")] = None,
    calibration: Annotated[Path | None, typer.Option(help="calibration data (.npz): ranges and shift reference")] = None,
    soak_s: Annotated[float, typer.Option(min=4.0, help="sustained-run duration, seconds (>= 4)")] = 60.0,
    stress_s: Annotated[float, typer.Option(min=1.0, help="concurrent-callers duration, seconds")] = 10.0,
    callers: Annotated[int, typer.Option(min=1, help="concurrent callers in the stress run")] = 4,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show Prefect's logs")] = False,
) -> None:
    """Run the production-readiness checks on a registered version and sign its manifest."""
    from flows._env import configure_embedded_defaults

    _need_one(version, alias)
    if eval_data is None:
        _fail(EdgeOptError("certification needs evaluation data: pass --eval DATA.npz"))
    configure_embedded_defaults(quiet=not verbose)
    from flows.certify import certify_flow

    rep = _run_flow(certify_flow, verbose, model_name=model_name, version=version, alias=alias,
                    evaluation=str(eval_data), calibration=str(calibration) if calibration else None,
                    soak_s=soak_s, stress_s=stress_s, callers=callers)
    cert = rep.certification
    table = Table(title=f"{model_name} version {cert.subject.version}: certification")
    for c in ("check", "verdict", "evidence"):
        table.add_column(c)
    for c in cert.checks:
        table.add_row(c.check, c.status, c.summary + (f" ({c.reason})" if c.reason and c.status != "pass" else ""))
    out.print(table)
    if cert.certified:
        out.print(f"CERTIFIED: `edgeopt approve {model_name} --version {cert.subject.version}` makes it the champion",
                  highlight=False)
    else:
        out.print(f"NOT CERTIFIED: failed {', '.join(cert.failed_checks)}", highlight=False)
    out.print(f"report: {rep.html}\nsigned bundle: {rep.bundle} (`edgeopt verify {rep.bundle}`)", highlight=False)
    if not cert.certified:
        raise typer.Exit(3)


@app.command()
def approve(
    model_name: Annotated[str, typer.Argument(help="registered model name")],
    version: Annotated[str, typer.Option("--version", help="the certified version to make champion")],
) -> None:
    """Move the 'champion' alias to a certified version (the previous one stays as 'previous-champion')."""
    from flows._env import configure_embedded_defaults

    _check_name(model_name)
    configure_embedded_defaults()
    from tasks import tracking

    try:
        r = tracking.approve(data_dir=str(_data_dir()), model_name=model_name, version=version)
    except EdgeOptError as exc:
        _fail(exc)
    if r["changed"] is None:
        out.print(f"{model_name} version {r['champion']} is already the champion; nothing changed")
    else:
        prev = f"version {r['previous']} is now '{tracking.PREVIOUS_ALIAS}'" if r["previous"] else "no previous champion"
        out.print(f"{model_name}: champion -> version {r['champion']} ({prev})")


@app.command()
def rollback(model_name: Annotated[str, typer.Argument(help="registered model name")]) -> None:
    """Swap 'champion' and 'previous-champion'."""
    from flows._env import configure_embedded_defaults

    _check_name(model_name)
    configure_embedded_defaults()
    from tasks import tracking

    try:
        r = tracking.rollback(data_dir=str(_data_dir()), model_name=model_name)
    except EdgeOptError as exc:
        _fail(exc)
    out.print(f"{model_name}: champion -> version {r['champion']}"
              + (f" (version {r['previous']} is now '{tracking.PREVIOUS_ALIAS}')" if r["previous"] else ""))


@app.command()
def verify(
    target: Annotated[str, typer.Argument(help="a signed bundle folder, or NAME:VERSION / NAME@ALIAS of a "
                                               "certified version")],
    public_key: Annotated[Path | None, typer.Option(help="public key (default: the one in the bundle)")] = None,
) -> None:
    """Check the signature and every digest of a certified artifact; refuse a changed byte."""
    from edgeopt.certify import provenance
    from edgeopt.errors import RegistryError

    try:
        if Path(target).exists():
            summary = provenance.verify(Path(target), public_key=public_key)
        else:
            summary = _verify_registered(target, public_key)
    except RegistryError as exc:  # nothing to verify: bad input
        _fail(exc)
    except EdgeOptError as exc:  # verified, and refused
        _fail(exc, 3)
    files = summary.get("files")
    out.print(f"verified: {target} — signature valid, {len(files) if isinstance(files, list | dict) else files} "
              "file digest(s) match the signed manifest", highlight=False)


def _verify_registered(target: str, public_key: Path | None) -> dict:
    from edgeopt.errors import RegistryError
    from flows._env import configure_embedded_defaults

    if ":" in target:
        name, version, alias = *target.rsplit(":", 1), None
    elif "@" in target:
        name, alias = target.rsplit("@", 1)
        version = None
    else:
        raise RegistryError(f"{target!r} is neither a folder nor NAME:VERSION / NAME@ALIAS")
    configure_embedded_defaults()
    from edgeopt.certify import provenance
    from tasks import tracking

    with tempfile.TemporaryDirectory() as tmp:
        bundle = tracking.certified_bundle(data_dir=str(_data_dir()), model_name=name, version=version, alias=alias,
                                           dest=tmp)
        return provenance.verify(bundle, public_key=public_key)


def _data_dir() -> Path:
    from edgeopt.settings import data_dir

    return data_dir()


@app.command()
def nightly(
    model: Annotated[Path, typer.Argument(help="model file (.onnx) or Hugging Face checkpoint folder")],
    profile: Annotated[str, typer.Option(help="target profile name or YAML path")] = "intel-cpu",
    calibration: Annotated[Path | None, typer.Option(help="calibration data")] = None,
    eval_data: Annotated[Path | None, typer.Option("--eval", help="evaluation data ('labels' for accuracy)")] = None,
    model_name: Annotated[str | None, typer.Option(help="registered model name")] = None,
    candidate: Annotated[list[str] | None, typer.Option("--candidate", help="only this candidate (repeatable)")] = None,
    certify: Annotated[bool, typer.Option(help="certify a challenger that beats the champion, then promote it")] = True,
    soak_s: Annotated[float, typer.Option(min=4.0, help="certification's sustained run, seconds")] = 30.0,
    duel_rounds: Annotated[int, typer.Option(min=2, help="interleaved rounds, challenger against champion")] = 3,
    min_improvement: Annotated[float, typer.Option(min=0.0, help="the challenger's speed-up over the champion "
                                                   "must clear 1 + this at its lower bound")] = 0.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show Prefect's logs")] = False,
) -> None:
    """Re-optimize when anything changed; promote the winner only when it beats the champion and is certified."""
    from flows._env import configure_embedded_defaults

    if not model.exists():
        _fail(EdgeOptError(f"model not found: {model}"))
    configure_embedded_defaults(quiet=not verbose)
    from flows.nightly import nightly_flow

    rep = _run_flow(nightly_flow, verbose, model=str(model), profile=profile,
                    calibration=str(calibration) if calibration else None,
                    evaluation=str(eval_data) if eval_data else None, model_name=model_name,
                    candidates=list(candidate or []) or None, certify=certify, soak_s=soak_s,
                    duel_rounds=duel_rounds, min_improvement=min_improvement)
    out.print(f"nightly {rep.model_name} on {rep.profile}: {rep.result}: {rep.reason}", highlight=False,
              soft_wrap=True)
    out.print(f"champion: {rep.champion_before or '-'} → {rep.champion_after or '-'}", highlight=False)


@app.command()
def drift(
    production: Annotated[Path, typer.Argument(help="a sample of production inputs (.npz, or sentences)")],
    calibration: Annotated[Path, typer.Option(help="the calibration data the model was optimized with")],
    model: Annotated[Path, typer.Option(help="model file (.onnx) or Hugging Face checkpoint folder")],
    profile: Annotated[str, typer.Option(help="target profile name or YAML path")] = "intel-cpu",
    model_name: Annotated[str | None, typer.Option(help="registered model name")] = None,
    eval_data: Annotated[Path | None, typer.Option("--eval", help="evaluation data for a re-optimization")] = None,
    psi_threshold: Annotated[float, typer.Option(min=0.0, help="mean PSI above this is drift")] = 0.2,
    ks_pvalue: Annotated[float, typer.Option(min=0.0, max=1.0, help="family-wise KS test level")] = 0.01,
    reoptimize: Annotated[bool, typer.Option(help="on drift, re-optimize with the production sample")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show Prefect's logs")] = False,
) -> None:
    """Compare production inputs with the calibration data (PSI, KS; embeddings for text). Exit 3 on drift."""
    from flows._env import configure_embedded_defaults

    for p in (production, calibration, model):
        if not p.exists():
            _fail(EdgeOptError(f"not found: {p}"))
    configure_embedded_defaults(quiet=not verbose)
    from flows.drift import drift_flow

    rep = _run_flow(drift_flow, verbose, production=str(production), calibration=str(calibration),
                    model=str(model), profile=profile, model_name=model_name,
                    evaluation=str(eval_data) if eval_data else None, psi_threshold=psi_threshold,
                    ks_pvalue=ks_pvalue, reoptimize=reoptimize)
    out.print(rep.summary, highlight=False, soft_wrap=True)
    if rep.nightly is not None:
        out.print(f"re-optimized: {rep.nightly.result}: {rep.nightly.reason}", highlight=False, soft_wrap=True)
    if rep.drifted:
        raise typer.Exit(3)
