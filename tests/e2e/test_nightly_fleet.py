"""The nightly deployment on the real fleet (``tests/e2e/conftest.py``: PostgreSQL, Prefect server on it,
MLflow server, a process worker): what a user runs with ``prefect deployment run
'nightly/digits-resnet-intel-cpu'``, on the reference CNN (digits-resnet), with a trimmed profile (two
candidates, one round) so a night takes a minute or two.

In order (one module, one fleet): the first night promotes its winner or records why not; the second
records "unchanged" in seconds; a failing night starts the notification flow (automation); a worker
killed in the middle of a night: the lost run is marked Crashed (heartbeat automation) and notified, the
re-run completes reusing every build and measurement that finished, and nothing was half-registered nor
an alias moved; a drift event starts re-optimization with the production sample as calibration
(automation); the Prefect UI's flow-run page (with its log) and the MLflow run page in headless Chromium.

Heavy (19 minutes here on 2 cores shared with other jobs, load 7-15; about 9 of them start the fleet and
train the CNN): ``make test-e2e`` runs it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from tests.conftest import write_profile
from tests.e2e.conftest import BIN, CHROMIUM, sh

pytestmark = [pytest.mark.slow, pytest.mark.heavy, pytest.mark.timeout(1200)]

NAME = "digits-resnet-e2e"
POOL = "intel-cpu"
NIGHTLY = f"nightly/digits-resnet-{POOL}"
DYNAMIC = {"name": "ort-int8-dynamic", "backend": "onnxruntime",
           "recipe": {"precision": "int8", "quantization": "dynamic"}}
FP32 = {"name": "ort-fp32-optimized", "backend": "onnxruntime", "recipe": {"graph_optimization": "all"}}
LOOSE = {"speedup_min": 0.5, "memory_reduction_min": -1.0, "accuracy_ratio_min": 0.8}
FIRST_RESULTS = {"promoted", "not-certified", "no-winner"}


def _wait(client, run_id, timeout: float, until=lambda fr: fr.state is not None and fr.state.is_final()):
    deadline = time.monotonic() + timeout
    while True:
        fr = client.read_flow_run(run_id)
        if until(fr):
            return fr
        assert time.monotonic() < deadline, (fr.name, fr.state)
        time.sleep(1)


def _run(client, deployment: str, parameters: dict, timeout: float = 600):
    from prefect.deployments import run_deployment

    started = time.monotonic()
    run = run_deployment(deployment, timeout=0, parameters=parameters)
    fr = _wait(client, run.id, timeout)
    return fr, time.monotonic() - started


def _artifacts(client, *run_ids) -> dict:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=list(run_ids))))
    return {a.key: a for a in arts}


def _logs(client, run_id) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    return "\n".join(e.message for e in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id]))))


def _family(client, run_id) -> list:
    """A flow run and its subflow runs (optimize, certify)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    subs = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(
        any_=[run_id])))
    return [client.read_flow_run(run_id), *subs]


def _task_runs(client, run_ids) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(run_ids))), limit=200)


def _triggered(client, deployment: str, after, where=lambda fr: True, timeout: float = 240):
    """The flow runs of ``deployment`` created after ``after`` that satisfy ``where`` (waits for one)."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter

    dep = client.read_deployment_by_name(deployment)
    deadline = time.monotonic() + timeout
    while True:
        runs = [fr for fr in client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(
            any_=[dep.id])), flow_run_filter=FlowRunFilter()) if fr.created and fr.created >= after and where(fr)]
        if runs:
            return runs
        assert time.monotonic() < deadline, f"no run of {deployment} was started by the automation"
        time.sleep(3)


def _mlflow(fleet):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=fleet["tracking"])


def _nightly_runs(cl) -> list:
    exp = cl.get_experiment_by_name(f"edgeopt/{NAME}")
    return cl.search_runs([exp.experiment_id], "tags.`edgeopt.flow` = 'nightly'", order_by=["attributes.start_time ASC"])


def _alias(cl, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(cl.get_model_version_by_alias(NAME, alias).version)
    except MlflowException:
        return None


def _versions_whole(cl) -> None:
    """Every version is whole: its artifact digest and candidate tags, its run finished, its model logged."""
    for mv in cl.search_model_versions(f"name = '{NAME}'"):
        assert mv.tags.get("artifact.sha256") and mv.tags.get("edgeopt.candidate"), (mv.version, mv.tags)
        assert cl.get_run(mv.run_id).info.status == "FINISHED", mv.version
        assert any(a.path == "model" for a in cl.list_artifacts(mv.run_id)), mv.version


@pytest.fixture(scope="module")
def night(fleet, client):
    """The reference CNN on the worker's data folder, a trimmed profile, the nightly/notify/drift deployments
    of this pool and the automations (``deployments/setup.py``, as ``fleet.sh up`` runs it)."""
    from edgeopt import zoo

    env = fleet["env"]
    entry = zoo.build("digits-resnet", out_dir=fleet["home"] / "zoo")
    profile = write_profile(fleet["tmp"] / "nightly-short.yaml", gates=LOOSE, candidates=[DYNAMIC, FP32])
    # `-n digits-resnet-<pool>` is the nightly and the drift deployment (prefect deploy matches names only)
    r = sh([str(BIN / "prefect"), "--no-prompt", "deploy", "-n", f"digits-resnet-{POOL}", "-n", f"notify-{POOL}"],
           env, 300)
    assert r.returncode == 0, r.stdout + r.stderr
    r = sh([str(BIN / "python"), "deployments/setup.py"], env, 180)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("edgeopt-flow-run-lost", f"edgeopt-nightly-failed-{POOL}", f"edgeopt-drift-{POOL}"):
        assert name in r.stdout, (name, r.stdout)
    params = {"model": str(entry.model), "calibration": str(entry.calibration), "evaluation": str(entry.evaluation),
              "profile": str(profile), "model_name": NAME, "soak_s": 4.0, "duel_rounds": 2}
    return {"entry": entry, "profile": profile, "params": params, "runs": {}}


def test_first_night_promotes_or_says_why(fleet, client, night):
    fr, wall = _run(client, NIGHTLY, {**night["params"], "candidates": [DYNAMIC["name"]]})
    night["runs"]["first"] = fr
    print(f"first night: {wall:.0f} s, {fr.state.name}")
    assert fr.state.is_completed(), (fr.state.name, fr.state.message, _logs(client, fr.id)[-3000:])
    assert fr.work_pool_name == POOL
    family = _family(client, fr.id)
    assert {f.flow_id for f in family[1:]}, "the optimize flow runs as a subflow"
    arts = _artifacts(client, *[f.id for f in family])
    # the nightly's verdict, the optimize subflow's candidate table and Pareto table, the MLflow link
    verdict = arts["nightly-nightly-short"].data
    assert "optimize-nightly-short" in arts and DYNAMIC["name"] in arts["optimize-nightly-short"].data
    assert "data:image/svg+xml;base64," in arts["pareto-chart-nightly-short"].data
    assert "mlflow-run" in arts and fleet["tracking"] in arts["mlflow-run"].data
    cl = _mlflow(fleet)
    (run,) = _nightly_runs(cl)
    result = run.data.tags["nightly.result"]
    print(f"first night's result: {result}: {run.data.tags['nightly.reason']}")
    assert result in FIRST_RESULTS and run.data.tags["nightly.reason"], run.data.tags
    assert run.data.tags["prefect.flow_run_id"] == str(fr.id)
    assert f"**{result}**" in verdict and run.data.tags["nightly.reason"][:60] in verdict, verdict
    exp = cl.get_experiment_by_name(f"edgeopt/{NAME}")
    assert exp.tags["edgeopt.nightly.result"] == result and exp.tags["edgeopt.nightly.digest"]
    if result == "promoted":  # the first winner: certified, then champion
        champion = _alias(cl, "champion")
        assert champion is not None and champion == _alias(cl, "candidate")
        assert cl.get_model_version(NAME, champion).tags["certification.status"] == "certified"
    else:
        assert _alias(cl, "champion") is None, result
    _versions_whole(cl)
    night["champion"] = _alias(cl, "champion")


def test_second_night_is_unchanged_in_seconds(fleet, client, night):
    assert "first" in night["runs"], "needs the first night"
    fr, wall = _run(client, NIGHTLY, {**night["params"], "candidates": [DYNAMIC["name"]]}, timeout=300)
    print(f"second night: {wall:.0f} s (flow run {fr.total_run_time.total_seconds():.1f} s), {fr.state.name}")
    assert fr.state.is_completed(), (fr.state.name, fr.state.message)
    # the flow's own time: the change digest and one MLflow run, no optimize subflow
    assert fr.total_run_time.total_seconds() < 60, fr.total_run_time
    assert len(_family(client, fr.id)) == 1, "an unchanged night runs no subflow"
    assert "**unchanged**" in _artifacts(client, fr.id)["nightly-nightly-short"].data
    cl = _mlflow(fleet)
    runs = _nightly_runs(cl)
    assert [r.data.tags["nightly.result"] for r in runs][1:] == ["unchanged"], [r.data.tags for r in runs]
    exp = cl.get_experiment_by_name(f"edgeopt/{NAME}")
    assert len([r for r in cl.search_runs([exp.experiment_id]) if r.info.run_name.startswith("optimize-")]) == 1
    assert _alias(cl, "champion") == night["champion"]


# the Prefect UI's run form: one `.schema-form-property` per parameter, its label "name" or "name (Optional)"
_PROP = ("[...document.querySelectorAll('.schema-form-property')].find(p => "
         "p.querySelector('.schema-form-property__label').innerText.trim().split(' ')[0] == %r)")


def _form_click(b, name: str, label: str) -> None:
    """Click the button labelled ``label`` (a type switch such as ``str``/``list``, or ``Add item``) of a parameter."""
    found = b.eval(f"(() => {{ const e = [...({_PROP % name}).querySelectorAll('button')]"
                   f".find(e => e.innerText.trim() == {label!r}); if (e) e.click(); return !!e }})()")
    assert found, f"parameter {name}: no button {label!r} in the form"


def _form_type(b, name: str, text: str) -> None:
    """Type ``text`` over the value of a parameter's (last) text field, as a user does (key events, Vue's v-model)."""
    b.wait_for(f"!!({_PROP % name}).querySelector('textarea, input:not([type=checkbox])')", 10,
               what=f"a text field for parameter {name}")
    b.eval(f"(() => {{ const f = [...({_PROP % name}).querySelectorAll('textarea, input:not([type=checkbox])')]"
           ".at(-1); f.focus(); f.select() })()")
    b.send("Input.insertText", text=text)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (`make browser` installs Debian's)")
def test_a_night_run_from_the_ui_form(fleet, client, night, tmp_path):
    """Run -> Custom run on the deployment's page in the Prefect UI: the typed form (model, data and zoo defaults
    pre-filled by the deployment), the profile, model name, candidate filter and budgets typed in, Submit; the
    run has exactly those parameters, runs on the worker, and (same inputs as the first night) is "unchanged"."""
    from datetime import UTC, datetime, timedelta

    from tests.e2e.browser import Browser

    assert "first" in night["runs"], "needs the first night"
    dep = client.read_deployment_by_name(NIGHTLY)
    since = datetime.now(UTC) - timedelta(seconds=5)
    with Browser(CHROMIUM, tmp_path) as b:
        b.goto(f"{fleet['ui']}/deployments/deployment/{dep.id}")
        b.wait_for("[...document.querySelectorAll('button')].some(e => e.innerText.trim() == 'Run')", 90,
                   what="the deployment page's Run button")
        b.eval("[...document.querySelectorAll('button')].find(e => e.innerText.trim() == 'Run').click()")
        b.wait_for("!![...document.querySelectorAll('a')].find(e => e.innerText.trim() == 'Custom run')", 30,
                   what="Run -> Custom run")
        b.eval("[...document.querySelectorAll('a')].find(e => e.innerText.trim() == 'Custom run').click()")
        b.wait_for(f"!!({_PROP % 'candidates'})", 60, what="the parameter form")
        # the deployment's defaults are in the form: the reference CNN and its data, relative to the worker's clone
        assert b.eval(f"({_PROP % 'model'}).querySelector('textarea').value") == dep.parameters["model"]
        # the flow's docstring is each field's description (Markdown: no `<...>` the renderer would drop)
        described = b.eval(f"({_PROP % 'model_name'}).querySelector('.schema-form-property__description').innerText")
        assert "registered model name in MLflow" in described and "digits-resnet-intel-cpu" in described, described
        _form_type(b, "profile", str(night["profile"]))
        _form_click(b, "model_name", "str")
        _form_type(b, "model_name", NAME)
        _form_click(b, "candidates", "list")
        _form_click(b, "candidates", "Add item")
        _form_type(b, "candidates", DYNAMIC["name"])
        _form_type(b, "soak_s", "4")
        _form_type(b, "duel_rounds", "2")
        b.screenshot(tmp_path / "prefect-custom-run.png")
        b.eval("[...document.querySelectorAll('button')].find(e => e.innerText.trim() == 'Submit').click()")
        b.wait_for("!location.pathname.endsWith('/run')", 30, what="the form to be submitted")
    # the run the form created (the schedule's runs carry the deployment's default profile)
    (created,) = _triggered(client, NIGHTLY, since, lambda n: n.parameters.get("model_name") == NAME, timeout=60)
    params = created.parameters
    assert params["profile"] == str(night["profile"]) and params["model_name"] == NAME, params
    assert params["candidates"] == [DYNAMIC["name"]] and params["soak_s"] == 4 and params["duel_rounds"] == 2, params
    assert params["model"] == dep.parameters["model"] == ".edgeopt/zoo/digits-resnet/model.onnx", params
    fr = _wait(client, created.id, 300)
    print(f"night from the UI form: {fr.name} {fr.state.name} in {fr.total_run_time.total_seconds():.1f} s")
    assert fr.state.is_completed() and fr.work_pool_name == POOL, (fr.state.name, fr.state.message)
    # the relative paths were read from the worker's data folder: the same inputs as before, so nothing to redo
    assert "**unchanged**" in _artifacts(client, fr.id)["nightly-nightly-short"].data, _logs(client, fr.id)[-2000:]
    assert _nightly_runs(_mlflow(fleet))[-1].data.tags["prefect.flow_run_id"] == str(fr.id)


def test_a_failed_night_starts_the_notification(fleet, client, night):
    from datetime import UTC, datetime, timedelta

    since = datetime.now(UTC) - timedelta(seconds=5)
    fr, _ = _run(client, NIGHTLY, {**night["params"], "model": str(fleet["tmp"] / "missing" / "model.onnx"),
                                   "model_name": f"{NAME}-broken"}, timeout=300)
    assert fr.state.is_failed(), fr.state
    (notify,) = _triggered(client, f"notify/notify-{POOL}", since, lambda n: n.parameters.get("flow_run_id") == str(fr.id))
    notify = _wait(client, notify.id, 300)
    assert notify.state.is_completed() and notify.parameters["state"] == "Failed", notify.state
    assert str(fr.id) in _artifacts(client, notify.id)["edgeopt-notification"].data


def _kill_worker(fleet) -> list[int]:
    """SIGKILL the worker and everything under it (its flow-run process runs in a session of its own)."""
    pid = int((fleet["tmp"] / "fleet" / "pids" / f"worker-{POOL}.pid").read_text())
    proc = psutil.Process(pid)
    procs = [proc, *proc.children(recursive=True)]
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    return [p.pid for p in procs]


def test_worker_killed_mid_night(fleet, client, night):
    """Kill the worker while the night measures; restart it; the re-run finishes on what was done."""
    from datetime import UTC, datetime, timedelta

    from prefect.deployments import run_deployment

    assert "first" in night["runs"], "needs the first night"
    cl = _mlflow(fleet)
    versions_before = {mv.version for mv in cl.search_model_versions(f"name = '{NAME}'")}
    since = datetime.now(UTC) - timedelta(seconds=5)
    params = {**night["params"], "candidates": None}  # both candidates: a changed night
    killed = run_deployment(NIGHTLY, timeout=0, parameters=params)
    # mid-run: the new candidate has been built and measured once (a fresh build and a fresh measurement)
    deadline = time.monotonic() + 600
    while True:
        family = _family(client, killed.id)
        done = {t.name: t for t in _task_runs(client, [f.id for f in family]) if t.state and t.state.is_completed()}
        if f"build-{FP32['name']}" in done and any(n.startswith(f"benchmark-{FP32['name']}-") for n in done):
            break
        assert family[0].state is None or not family[0].state.is_final(), family[0].state
        assert time.monotonic() < deadline, "the new candidate was never built"
        time.sleep(1)
    pids = _kill_worker(fleet)
    assert len(pids) >= 2, "the worker and its flow-run process"
    done = {t.name for t in _task_runs(client, [f.id for f in _family(client, killed.id)])
            if t.state and t.state.is_completed() and t.name.startswith(("build-", "benchmark-"))}
    where = sorted(f.name for f in _family(client, killed.id))
    print(f"killed {pids} (flow runs {where}); finished before: {sorted(done)}")
    assert client.read_flow_run(killed.id).state.is_running()
    # nothing half-written: the champion did not move, every version is whole
    assert _alias(cl, "champion") == night["champion"]
    _versions_whole(cl)

    up = sh(["bash", fleet["script"], "up"], fleet["env"], 300)  # what a user runs: starts what is not running
    assert up.returncode == 0 and f"worker-{POOL} started" in up.stderr, up.stderr
    # the automations were kept, not re-created: the lost-run one still remembers the killed run's heartbeats
    assert "unchanged (" in up.stderr and "edgeopt-flow-run-lost" in up.stderr.split("unchanged (")[1], up.stderr
    rerun, wall = _run(client, NIGHTLY, params, timeout=900)
    print(f"re-run: {wall:.0f} s, {rerun.state.name}")
    assert rerun.state.is_completed(), (rerun.state.name, rerun.state.message, _logs(client, rerun.id)[-3000:])
    again = {t.name: t for t in _task_runs(client, [f.id for f in _family(client, rerun.id)])}
    # every build and measurement that finished before the kill is served from the cache
    assert done and all(again[n].state.name == "Cached" for n in done), {n: again[n].state.name for n in done}
    reused = [n for n, t in again.items() if t.state.name == "Cached" and n.startswith(("build-", "benchmark-"))]
    print(f"re-run reused: {sorted(reused)}")
    # the lost run: marked Crashed by the heartbeat automation, which the nightly-failed automation reports
    lost = _wait(client, killed.id, 300, until=lambda fr: fr.state.is_final())
    assert lost.state.is_crashed(), lost.state
    assert "heartbeat" in (lost.state.message or ""), lost.state.message
    (notify,) = _triggered(client, f"notify/notify-{POOL}", since,
                           lambda n: n.parameters.get("flow_run_id") == str(killed.id))
    assert notify.parameters["state"] == "Crashed", notify.parameters
    # the registry: versions whole, at most the re-run's winner added, the champion where the re-run left it
    _versions_whole(cl)
    run = _nightly_runs(cl)[-1]
    assert run.data.tags["prefect.flow_run_id"] == str(rerun.id), "the lost run recorded no nightly result"
    assert len({mv.version for mv in cl.search_model_versions(f"name = '{NAME}'")} - versions_before) <= 1
    result = run.data.tags["nightly.result"]
    expected = _alias(cl, "candidate") if result == "promoted" else night["champion"]
    assert _alias(cl, "champion") == expected, (result, run.data.tags["nightly.reason"])
    night["runs"]["rerun"] = rerun


def test_drift_starts_reoptimization_with_the_production_sample(fleet, client, night):
    from datetime import UTC, datetime, timedelta

    entry = night["entry"]
    with np.load(entry.calibration) as cal:
        shifted = {k: (v * 1.5 + 0.5).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in cal.items()}
    production = fleet["tmp"] / "production.npz"
    np.savez(production, **shifted)
    since = datetime.now(UTC) - timedelta(seconds=5)
    fr, _ = _run(client, f"drift/digits-resnet-{POOL}", {
        "production": str(production), "calibration": str(entry.calibration), "model": str(entry.model),
        "evaluation": str(entry.evaluation), "profile": str(night["profile"]), "model_name": NAME}, timeout=300)
    assert fr.state.is_completed(), (fr.state.name, fr.state.message)
    assert "**drift**" in _artifacts(client, fr.id)["drift-nightly-short"].data
    (started,) = _triggered(client, NIGHTLY, since, lambda n: n.parameters.get("calibration") == str(production))
    assert started.work_pool_name == POOL and started.parameters["model_name"] == NAME, started.parameters
    done = _wait(client, started.id, 900)
    assert done.state.is_completed(), (done.state.name, done.state.message)
    run = _nightly_runs(_mlflow(fleet))[-1]
    assert run.data.tags["prefect.flow_run_id"] == str(done.id) and run.data.tags["nightly.result"] != "unchanged"


def _page_shows(b, url: str, texts: list[str], png: Path) -> None:
    """Open ``url`` and wait until the single-page app has rendered every one of ``texts``; a screenshot."""
    b.goto(url)
    b.wait_for(f"(() => {{ const t = document.body ? document.body.textContent : ''; "
               f"return {json.dumps(texts)}.every(x => t.includes(x)) }})()", 90, what=f"{texts} on {url}")
    assert b.screenshot(png).stat().st_size > 10_000


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (`make browser` installs Debian's)")
def test_the_uis_show_the_night(fleet, night, tmp_path):
    from tests.e2e.browser import Browser

    fr = night["runs"].get("first")
    assert fr is not None, "needs the first night"
    cl = _mlflow(fleet)
    run = next(r for r in _nightly_runs(cl) if r.data.tags["prefect.flow_run_id"] == str(fr.id))
    with Browser(CHROMIUM, tmp_path) as b:
        # the Prefect UI's flow-run page: the run, its state, and its log (the nightly's verdict line)
        _page_shows(b, f"{fleet['ui']}/runs/flow-run/{fr.id}", [fr.name, "Completed", f"nightly {NAME} on nightly-short"],
                    tmp_path / "prefect-flow-run.png")
        # the MLflow run page of that night: its name and its result tag
        _page_shows(b, f"{fleet['tracking']}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}",
                    [run.info.run_name, run.data.tags["nightly.result"]], tmp_path / "mlflow-run.png")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (`make browser` installs Debian's)")
def test_the_pareto_chart_renders_in_the_prefect_ui(fleet, client, night, tmp_path):
    """The first night's Pareto chart artifact (Markdown with the SVG as a data-URI image): on its artifact page
    the image is decoded (natural size), laid out (nonzero box), and its pixels show the candidates' points."""
    from PIL import Image

    from tests.e2e.browser import Browser

    fr = night["runs"].get("first")
    assert fr is not None, "needs the first night"
    art = _artifacts(client, *[f.id for f in _family(client, fr.id)])["pareto-chart-nightly-short"]
    img = "[...document.querySelectorAll('.markdown-renderer img')].find(i => i.src.startsWith('data:image/svg+xml'))"
    with Browser(CHROMIUM, tmp_path) as b:
        b.goto(f"{fleet['ui']}/artifacts/artifact/{art.id}")
        box = b.wait_for(f"(() => {{ const i = {img}; if (!i || !i.complete || !i.naturalWidth) return null; "
                         "const r = i.getBoundingClientRect(); return {x: r.x + scrollX, y: r.y + scrollY, "
                         "width: r.width, height: r.height, natural: [i.naturalWidth, i.naturalHeight]} })()",
                         90, what="the Pareto chart's image, decoded")
        assert box["width"] >= 200 and box["height"] >= 150, box
        png = b.screenshot(tmp_path / "prefect-pareto-chart.png",
                           clip={k: box[k] for k in ("x", "y", "width", "height")})
    raw = Image.open(png).convert("RGB").tobytes()
    pixels = [tuple(raw[i:i + 3]) for i in range(0, len(raw), 3)]
    near = lambda c, ref: sum(abs(a - b) for a, b in zip(c, ref)) < 60
    points = sum(near(c, (0x1A, 0x73, 0xE8)) or near(c, (0xE8, 0x71, 0x0A)) for c in pixels)  # frontier, selected
    dark = sum(max(c) < 80 for c in pixels)  # axes and labels
    white = sum(min(c) > 240 for c in pixels)
    print(f"Pareto chart on the artifact page: {box}; {points} point pixels, {dark} dark, {white} white of {len(pixels)}")
    assert white > len(pixels) * 0.5, "the chart's white background is not there"
    assert points > 50 and dark > 200, (points, dark)
