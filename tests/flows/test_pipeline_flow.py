"""The pipeline flow on the tiny dataset against a real Prefect server, read back through the
Prefect client; and the pipeline served as a cron deployment whose runs the runner starts."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from flows.pipeline import STAGES
from flows.pipeline import main as pipeline_main
from flows.serve import DEFAULT_CRON, serve_arguments
from tasks.params import ParamsError, load_params
from tests.flows.conftest import PROJECT_ROOT, VENV_BIN


def client_for(url: str):
    """A sync Prefect client against `url` (this process may have another API configured)."""
    from contextlib import ExitStack

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    stack = ExitStack()
    stack.enter_context(temporary_settings({PREFECT_API_URL: url}))
    client = stack.enter_context(get_client(sync_client=True))
    return stack, client


@pytest.fixture(scope="module")
def pipeline_run(tiny_project, prefect_server):
    from prefect.client.schemas.filters import (FlowFilter, FlowFilterName, FlowRunFilter,
                                                FlowRunFilterDeploymentId, FlowRunFilterParentFlowRunId)
    from prefect.client.schemas.sorting import FlowRunSort

    t0 = time.perf_counter()
    done = subprocess.run([str(VENV_BIN / "python"), "-m", "flows.pipeline"], cwd=tiny_project["root"],
                          env=tiny_project["env"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    wall = time.perf_counter() - t0
    stack, client = client_for(prefect_server["url"])
    with stack:
        parent = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["pipeline"])),
            flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(is_null_=True)),
            sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id])),
            sort=FlowRunSort.START_TIME_ASC)
        names = {run.flow_id: client.read_flow(run.flow_id).name for run in children}
    return {"parent": parent, "children": [(names[r.flow_id], r) for r in children], "wall_s": wall}


@pytest.mark.slow
def test_pipeline_runs_every_stage_as_a_completed_sub_flow(pipeline_run, tiny_project):
    assert pipeline_run["parent"].state.is_completed(), pipeline_run["parent"].state
    children = pipeline_run["children"]
    # tiny has item text, so embed runs; in pipeline order, one run each
    assert [name for name, _ in children] == [name for name, _ in STAGES]
    for name, run in children:
        assert run.state.is_completed(), f"{name}: {run.state}"
    out = tiny_project["root"] / "data" / "tiny"
    manifest = json.loads((out / "candidates" / "manifest.json").read_text())
    assert manifest["rows"] == tiny_project["counts"]["users"] * manifest["top_n"]
    assert json.loads((tiny_project["root"] / "reports" / "tiny" / "metrics.json").read_text())["methods"]


@pytest.mark.slow
def test_served_deployment_has_the_cron_schedule_and_its_runs_start(tiny_project, prefect_server):
    """`flows.serve` registers the deployment; a run created from it is picked up by the runner,
    imports flows.pipeline and gets its parameters (a bad dataset makes it fail fast, by name)."""
    proc = subprocess.Popen([str(VENV_BIN / "python"), "-m", "flows.serve", "--cron", "*/10 * * * *",
                             "--name", "retrain-test"], cwd=tiny_project["root"], env=tiny_project["env"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        stack, client = client_for(prefect_server["url"])
        with stack:
            deadline, deployment = time.time() + 120, None
            while deployment is None and time.time() < deadline and proc.poll() is None:
                try:
                    deployment = client.read_deployment_by_name("pipeline/retrain-test")
                except Exception:  # not registered yet
                    time.sleep(1)
            assert deployment is not None, "the deployment was not registered"
            assert [s.schedule.cron for s in deployment.schedules] == ["*/10 * * * *"]
            assert deployment.parameters == {"overrides": ["data.dataset=tiny"]}
            assert deployment.entrypoint == "flows.pipeline.pipeline_flow"
            run = client.create_flow_run_from_deployment(deployment.id,
                                                         parameters={"overrides": ["data.dataset=absent"]})
            deadline = time.time() + 120
            while not (run := client.read_flow_run(run.id)).state.is_final() and time.time() < deadline:
                time.sleep(1)
            assert run.state.is_failed(), run.state
            assert "'absent' is not a key of `datasets`" in run.state.message
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.mark.slow
def test_the_ui_shows_the_run_its_stage_runs_and_the_leaderboard(pipeline_run, prefect_server, tiny_project):
    """Headless Chromium on the test server's UI after the tiny pipeline run: the run page lists
    its stage sub-runs by name, the leaderboard artifact shows every method. Screenshots go to
    reports/ui-test/ for a person to look at."""
    from tests.flows.browser import Browser, chromium_path

    executable = chromium_path()
    if executable is None:
        pytest.skip("chromium is not installed: `.ci/install-chromium` (or `make browser`) installs Debian's package")
    base = prefect_server["url"].removesuffix("/api")
    parent = pipeline_run["parent"]
    stage_names = [run.name for _, run in pipeline_run["children"]]
    assert parent.name.startswith("pipeline-tiny-") and all(n.endswith(parent.name[len("pipeline"):])
                                                             for n in stage_names)  # named by dataset and hash
    assert all("stage" in run.tags and name in run.tags for name, run in pipeline_run["children"])
    methods = json.loads((tiny_project["root"] / "reports" / "tiny" / "metrics.json").read_text())["methods"]
    shots = PROJECT_ROOT / "reports" / "ui-test"
    [evaluate_run] = [run for name, run in pipeline_run["children"] if name == "evaluate"]
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    stack, client = client_for(prefect_server["url"])
    with stack:
        [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["leaderboard-tiny"]), flow_run_id=ArtifactFilterFlowRunId(any_=[evaluate_run.id])))
    assert artifact.type == "table"
    with Browser(executable) as browser:
        text = browser.route(base, f"/runs/flow-run/{parent.id}?tab=Subflow%20Runs", [parent.name, *stage_names[:3]])
        browser.screenshot(shots / "pipeline-run.png")
        assert parent.name in text and "Completed" in text, text[:2000]
        missing = [n for n in stage_names if n not in text]
        if missing:  # the sub-runs list is paged: the rest on the runs page
            text += browser.route(base, "/runs", missing)
            browser.screenshot(shots / "runs.png")
        assert not [n for n in stage_names if n not in text], text[:2000]
        # /artifacts/key/<key> lists the versions; the table is on the page of this run's version
        text = browser.route(base, "/artifacts/key/leaderboard-tiny", ["leaderboard-tiny", evaluate_run.name])
        browser.screenshot(shots / "leaderboard-versions.png")
        assert evaluate_run.name in text, text[:2000]
        text = browser.route(base, f"/artifacts/artifact/{artifact.id}", [*methods, "valid recall@10"])
        browser.screenshot(shots / "leaderboard-artifact.png")
        assert all(m in text for m in methods) and "valid recall@10" in text, text[:2000]


def test_serve_defaults_to_three_am_and_the_params_yaml_dataset():
    dataset = load_params().data.dataset
    kwargs = serve_arguments([])
    assert DEFAULT_CRON == "0 3 * * *" and kwargs["cron"] == DEFAULT_CRON
    assert kwargs["name"] == f"retrain-{dataset}"
    assert kwargs["parameters"] == {"overrides": [f"data.dataset={dataset}"]}
    kwargs = serve_arguments(["--cron", "30 1 * * 0", "--dataset", "scientific", "-S", "backbone.train.epochs=16"])
    assert kwargs["cron"] == "30 1 * * 0" and kwargs["name"] == "retrain-scientific"
    assert kwargs["parameters"] == {"overrides": ["data.dataset=scientific", "backbone.train.epochs=16"]}


def test_a_typo_fails_before_any_run_starts():
    with pytest.raises(ParamsError, match="backbone.train.epoch"):
        serve_arguments(["-S", "backbone.train.epoch=16"])
    with pytest.raises(ParamsError, match="'nowhere' is not a key"):
        serve_arguments(["--dataset", "nowhere"])
    with pytest.raises(ParamsError, match="candidates.top"):
        pipeline_main(["-S", "candidates.top=5"])
