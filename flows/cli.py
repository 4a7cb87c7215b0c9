"""The ``edgeopt`` command line: optimize, assess, profiles, zoo; cross-validate, certify, approve, rollback, verify.

It is the outermost layer (CLI → flows → tasks → edgeopt) and sets the embedded defaults
(Prefect's ephemeral API and a local MLflow store under ``$EDGEOPT_HOME``) before Prefect loads.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgeopt.errors import EdgeOptError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
profiles_app = typer.Typer(no_args_is_help=True, help="List and show target profiles.")
zoo_app = typer.Typer(no_args_is_help=True, help="Reference models built locally.")
app.add_typer(profiles_app, name="profiles")
app.add_typer(zoo_app, name="zoo")

# Outside a terminal (CI logs, pipes) rich would wrap the table at 80 columns.
out = Console() if sys.stdout.isatty() else Console(width=200)
err = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=200)


def _fail(exc: BaseException, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@app.command()
def optimize(
    model: Annotated[Path, typer.Argument(help="model: an .onnx file or a Hugging Face checkpoint folder")],
    profile: Annotated[str, typer.Option("--profile", "-p", help="target profile name or .yaml path")] = "intel-cpu",
    calibration: Annotated[Path | None, typer.Option(help="calibration data (.npz; .txt/.jsonl for text)")] = None,
    eval_data: Annotated[Path | None, typer.Option("--eval", help="evaluation data (.npz with optional "
                                                                  "'labels'; .txt/.jsonl for text)")] = None,
    candidate: Annotated[list[str] | None, typer.Option("--candidate", "-c", help="only this candidate (repeatable)")] = None,
    model_name: Annotated[str | None, typer.Option(help="registered model name (default: <model>-<profile>)")] = None,
    refresh: Annotated[bool, typer.Option(help="rebuild and re-measure, ignoring cached results")] = False,
    allow_hardware_mismatch: Annotated[bool, typer.Option(help="run on a machine that does not fit the profile")] = False,
    strict: Annotated[bool, typer.Option(help="exit with code 3 when no candidate passes its gates")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the full report as JSON here")] = None,
    seq_len: Annotated[int | None, typer.Option(help="token length for text data (default: the profile's)")] = None,
    shape: Annotated[list[str] | None, typer.Option("--shape", help="input shape NAME=1x3x640x640 for dynamic dims "
                                                    "(repeatable; NAME=scalar for a 0-d input); the batch dim "
                                                    "takes the profile's batch size")] = None,
    synthetic_data: Annotated[bool, typer.Option("--synthetic-data", help="calibrate and evaluate on generated "
                                                 "inputs at the --shape sizes where no data is given (the report "
                                                 "says so)")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show Prefect's logs")] = False,
) -> None:
    """Build, benchmark, evaluate and gate every candidate of PROFILE for MODEL; register the winner."""
    from edgeopt.names import check_name
    from flows._env import configure_embedded_defaults

    try:  # before anything is configured or written
        if model_name is not None:
            check_name(model_name, what="--model-name")
    except EdgeOptError as exc:
        _fail(exc)

    configure_embedded_defaults(quiet=not verbose)
    # Pre-flight: a wrong profile, model or data fails in a second, before Prefect starts
    # (the flow checks the same again when it runs from a deployment).
    from edgeopt import workflow
    from edgeopt.data import load_dataset
    from edgeopt.intake import assess as do_assess
    from edgeopt.profiles import load_profile
    from edgeopt.text import is_text_data

    try:
        prof = load_profile(profile)
        prof.candidate_specs(tuple(candidate or ()))
        a = do_assess(model)
        if a.kind == "llm":  # llama.cpp candidates: evaluation text, and calibration text for an imatrix
            from edgeopt import llm_workflow

            llm_workflow.check_model(a)
            specs, _ = llm_workflow.plan(prof, only=tuple(candidate or ()), model_format=a.model.format)
            llm_workflow.check_data(specs, calibration=str(calibration) if calibration else None,
                                    evaluation=str(eval_data) if eval_data else None)
        text = any(p is not None and is_text_data(p) for p in (calibration, eval_data))
        for role, path in (("calibration", calibration), ("evaluation", eval_data)):
            if path is None:
                continue
            if is_text_data(path):
                from edgeopt.text import load_sentences

                load_sentences(path)
            elif a.model.format == "onnx":
                load_dataset(path, signature=a.inputs, role=role)
        if a.model.format == "onnx" and not text:  # the shapes every input runs at, then the data at those
            a = workflow.resolve_input_shapes(a, shapes=list(shape or []), profile=prof,
                                              evaluation=str(eval_data) if eval_data else None,
                                              seq_len=seq_len or prof.benchmark.seq_len)
            workflow.extra_shape_settings(a, shapes=list(shape or []), profile=prof,
                                          evaluation=str(eval_data) if eval_data else None,
                                          seq_len=seq_len or prof.benchmark.seq_len)
            workflow.check_data(a, calibration=str(calibration) if calibration else None,
                                evaluation=str(eval_data) if eval_data else None)
            if synthetic_data and not (calibration and eval_data):
                workflow.synthetic_data(a, work_dir=None)
    except EdgeOptError as exc:
        _fail(exc)
    from flows._env import PrefectAPIUnavailable, ensure_prefect_api
    from flows.optimize import add_progress_listener, optimize_flow

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err,
                  transient=True, disable=not err.is_interactive) as progress:
        bar = progress.add_task("starting Prefect (embedded API)...", total=None)
        remove = add_progress_listener(lambda stage, detail: progress.update(bar, description=f"{stage}: {detail}"))
        try:
            # Start (or reach) Prefect's API first: a start-up failure is one line, exit 4, and
            # nothing is written (the flow creates its MLflow run only once the API is up).
            ensure_prefect_api()
            result = optimize_flow(model=str(model), profile=profile,
                                   calibration=str(calibration) if calibration else None,
                                   evaluation=str(eval_data) if eval_data else None,
                                   candidates=list(candidate) if candidate else None, model_name=model_name,
                                   refresh=refresh, allow_hardware_mismatch=allow_hardware_mismatch,
                                   seq_len=seq_len, shapes=list(shape) if shape else None,
                                   synthetic_data=synthetic_data)
        except PrefectAPIUnavailable as exc:
            progress.stop()
            if verbose:
                import traceback

                sys.stderr.write("".join(traceback.format_exception(exc)))
            else:
                exc = PrefectAPIUnavailable(f"{exc} (--verbose shows details)")
            _fail(exc, PrefectAPIUnavailable.exit_code)
        except EdgeOptError as exc:
            progress.stop()
            _fail(exc)
        finally:
            remove()
    _print_report(result)
    if json_out:
        json_out.write_text(result.model_dump_json(indent=2), encoding="utf-8")
    if strict and not result.selection.selected:
        raise typer.Exit(3)


def _print_report(result) -> None:
    from edgeopt import report

    table = Table(title=f"{result.model_name} on {result.profile}", show_lines=False)
    llm = any(o.generation for o in result.outcomes)
    cols = report.LLM_CLI_COLUMNS if llm else report.CLI_COLUMNS
    for c in cols:
        table.add_column(c, justify="left" if c in ("candidate", "verdict") else "right")
    for r in (report.llm_rows if llm else report.rows)(result.outcomes, result.selection):
        table.add_row(*(r[c] for c in cols))
    out.print(table)
    if result.input_shapes:
        from edgeopt.input_shapes import describe

        out.print(f"input shapes (batch included): {describe(result.input_shapes)}", highlight=False, soft_wrap=True)
    if result.shape_settings:
        out.print(f"shape settings: rows -{', -'.join(result.shape_settings)} measure each candidate at those shapes "
                  "against the baseline at the same shape; a candidate passes only if it passes at every shape "
                  "(gate every-shape)", highlight=False, soft_wrap=True)
    if result.synthetic_data:
        from edgeopt.report import synthetic_note

        out.print(f"synthetic data: {synthetic_note(result.synthetic_data)}", highlight=False, soft_wrap=True)
    if result.per_sample_inputs:
        from edgeopt.report import per_sample_note

        out.print(per_sample_note(result.per_sample_inputs), highlight=False, soft_wrap=True)
    sources = sorted({o.benchmark.memory_source for o in result.outcomes if o.benchmark and o.benchmark.memory_source})
    if sources:
        out.print(f"memory figures: {'; '.join(sources)}", highlight=False, soft_wrap=True)
    if llm:
        g = next(o.generation for o in result.outcomes if o.generation)
        out.print(f"generation: the same {g.prompt_tokens}-token prompt, {g.gen_tokens} generated tokens and "
                  f"{g.threads} thread(s) for every row, fresh process each, rounds interleaved; speed-up = tokens/s "
                  "/ the F16 reference's in this run; KLD and top-1 agreement against the F16 reference",
                  highlight=False, soft_wrap=True)
    note = report.spread_note(result.outcomes)
    if note:
        out.print(f"speed-up intervals include {note}", highlight=False, soft_wrap=True)
    out.print(result.selection.message, highlight=False)
    for miss in result.selection.nearest_misses:
        out.print(f"  nearest miss: {miss}", highlight=False)
    for o in result.outcomes:
        if o.failure:
            out.print(f"  {o.name} failed ({o.failure.reason}): {o.failure.message}", highlight=False)
    if result.cached:
        out.print(f"reused from an earlier run (with their baselines, measured together then): "
                  f"{', '.join(result.cached)}; --refresh re-measures", highlight=False, soft_wrap=True)
        if result.remeasured:
            out.print(f"measured in this run: {', '.join(result.remeasured)}", highlight=False, soft_wrap=True)
    if result.registered_version:
        out.print(f"registered: {result.model_name} version {result.registered_version} (alias 'candidate')")
    out.print(f"MLflow run: {result.mlflow_run_url}  (store: {result.tracking_uri}; `make mlflow-ui` to browse)",
              highlight=False, soft_wrap=True)
    if result.flow_run_id:
        where = result.flow_run_url
        if not where or where.startswith("None"):
            where = f"http://127.0.0.1:4200/runs/flow-run/{result.flow_run_id}"
        out.print(f"Prefect flow run: {result.flow_run_id}  ({where}; `make prefect-ui` to browse)",
                  highlight=False, soft_wrap=True)


@app.command()
def assess(
    model: Annotated[Path, typer.Argument(help="model file (.onnx, .gguf) or Hugging Face checkpoint folder")],
    json_output: Annotated[bool, typer.Option("--json", help="print the assessment as JSON")] = False,
) -> None:
    """Validate a model and describe it: size, parameters, ops, I/O, kind, INT8 readiness."""
    from edgeopt.intake import assess as do_assess

    try:
        a = do_assess(model)
    except EdgeOptError as exc:
        _fail(exc)
    if json_output:
        out.print_json(a.model_dump_json())
        return
    if a.llm is not None:
        _print_llm(model, a)
        return
    out.print(f"[bold]{model}[/]  kind={a.kind}  params={a.params:,}  size={a.model.size_bytes / 1e6:.2f} MB  "
              f"opset={a.opset}  ir={a.ir_version}")
    out.print(f"kind {a.kind}: {a.kind_reason}", highlight=False)
    if a.constant_params:
        out.print(f"params in Constant nodes: {a.constant_params:,}", highlight=False)
    if a.runtime_opsets:
        out.print("runtimes load opset: " + ", ".join(f"{n} <= {v}" for n, v in sorted(a.runtime_opsets.items())),
                  highlight=False)
    out.print(f"sha256 {a.model.sha256}", highlight=False)
    for s in a.inputs:
        out.print(f"  input  {s.name}: {s.dtype} {list(s.shape)}", highlight=False)
    for s in a.outputs:
        out.print(f"  output {s.name}: {s.dtype} {list(s.shape)}", highlight=False)
    out.print("ops: " + ", ".join(f"{k}×{v}" for k, v in a.op_histogram.items()), highlight=False)
    if a.control_flow_ops:
        out.print("inside If/Loop/Scan: " + ", ".join(f"{k}×{v}" for k, v in a.control_flow_ops.items()),
                  highlight=False)
    out.print(f"INT8 coverage {a.int8_coverage:.0%}; left in float: {', '.join(a.unquantizable_ops) or 'none'}")
    for note in a.notes:
        out.print(f"[yellow]warning:[/] {note}", highlight=False)


def _print_llm(model: Path, a) -> None:
    m = a.llm
    out.print(f"[bold]{model}[/]  kind=llm  format={a.model.format}  params={a.params:,}  "
              f"size={a.model.size_bytes / 1e6:.2f} MB", highlight=False)
    out.print(f"architecture {m.architecture} (family {m.family}); context {m.context_length}; vocab {m.vocab_size}; "
              f"{m.layers} layers, hidden {m.hidden_size}, heads {m.heads} (KV {m.kv_heads}), head dim {m.head_dim}",
              highlight=False)
    out.print(f"KV cache {m.kv_cache_bytes_per_token:,} bytes per token at F16 "
              f"({m.kv_cache_bytes_per_token * m.context_length / 2**20:.1f} MiB at the full context)", highlight=False)
    out.print(f"tokenizer: {m.tokenizer}", highlight=False)
    if m.tensor_types:
        out.print("tensor types: " + ", ".join(f"{k}×{v}" for k, v in m.tensor_types.items())
                  + (f"  (file type {m.file_type})" if m.file_type else ""), highlight=False)
    out.print(f"sha256 {a.model.sha256}", highlight=False)


@profiles_app.command("list")
def profiles_list() -> None:
    """List the available profiles."""
    from edgeopt.profiles import list_profiles, load_profile

    table = Table("profile", "arch", "device", "candidates", "description")
    for name in list_profiles():
        try:
            p = load_profile(name)
        except EdgeOptError as exc:
            table.add_row(name, "-", "-", "-", f"[red]invalid: {exc}[/]")
            continue
        table.add_row(name, p.hardware.arch, p.hardware.device, str(len(p.candidates)), p.description)
    out.print(table)


@profiles_app.command("show")
def profiles_show(name: Annotated[str, typer.Argument(help="profile name or .yaml path")]) -> None:
    """Show a profile, validated, with every default filled in."""
    import yaml

    from edgeopt.profiles import load_profile

    try:
        p = load_profile(name)
    except EdgeOptError as exc:
        _fail(exc)
    doc = json.loads(p.model_dump_json())
    # a kind's overrides: only what it sets (the rest comes from `gates`)
    doc["kind_gates"] = {k: {f: v for f, v in g.items() if v is not None} for k, g in doc["kind_gates"].items()}
    out.print(yaml.safe_dump(doc, sort_keys=False), highlight=False)


@zoo_app.command("build")
def zoo_build(
    name: Annotated[list[str] | None, typer.Argument(help="models to build (default: digits-resnet)")] = None,
    force: Annotated[bool, typer.Option(help="rebuild even if already built")] = False,
) -> None:
    """Build reference models (trained here, offline) with their calibration and evaluation data."""
    from edgeopt import zoo
    from edgeopt.settings import data_dir

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err,
                  transient=True, disable=not err.is_interactive) as progress:
        for model_name in name or ["digits-resnet"]:
            bar = progress.add_task(f"{model_name}: building", total=None)
            try:
                entry = zoo.build(model_name, out_dir=data_dir() / "zoo", force=force,
                                  progress=lambda msg, b=bar, n=model_name: progress.update(b, description=f"{n}: {msg}"))
            except EdgeOptError as exc:
                progress.stop()
                _fail(exc)
            progress.remove_task(bar)
            out.print(f"{entry.name}: held-out accuracy {entry.accuracy:.4f}; model {entry.model}", highlight=False)
            out.print(f"  --calibration {entry.calibration} --eval {entry.evaluation}", highlight=False)


@zoo_app.command("list")
def zoo_list() -> None:
    """List the reference models."""
    from edgeopt import zoo

    for model_name, desc in zoo.ZOO_MODELS.items():
        out.print(f"{model_name}: {desc}", highlight=False)


# the lifecycle commands (cross-validate, certify, approve, rollback, verify) and `edgeopt fleet status`
# register themselves on `app`
from flows import cli_fleet, cli_lifecycle  # noqa: F401


def main() -> None:
    import os

    from edgeopt import native_log

    # Native runtime logs (C++ code writing to descriptor 2) go to each build's log, not the terminal;
    # --verbose leaves them on the terminal and echoes the benchmark workers' too. Before any logging
    # handler is made: handlers keep the sys.stderr of their time.
    if any(a in ("--verbose", "-v") for a in sys.argv[1:]):
        os.environ[native_log.ECHO_ENV] = "1"
    else:
        native_log.divert()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except EdgeOptError as exc:  # pragma: no cover - commands handle their own
        err.print(f"error: {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(getattr(exc, "exit_code", 2))


if __name__ == "__main__":
    main()
