"""prefect.yaml and the work-pool plumbing without a server: the rendered deployments, the device
keys a pool sets, which stage makes each input, and the lock record a stage run hands back."""

from __future__ import annotations

import yaml

from flows.run_stage import lock_markdown, record_from_markdown
from tasks import deployments
from tasks.env import PROJECT_ROOT
from tasks.params import load_params
from tasks.stages import STAGES


def test_prefect_yaml_is_rendered_from_the_declarations():
    assert (PROJECT_ROOT / "prefect.yaml").read_text(encoding="utf-8") == deployments.render_prefect_yaml(), \
        "prefect.yaml differs from tasks/stages.py: run `python -m tasks.deployments`"


def test_every_stage_is_deployed_on_its_declared_pool():
    spec = yaml.safe_load(deployments.render_prefect_yaml())
    assert spec["pull"] == []  # the worker's checkout is the code; no default pull step
    got = {d["name"]: d for d in spec["deployments"]}
    assert list(got) == list(STAGES)
    for name, d in got.items():
        assert d["entrypoint"] == deployments.ENTRYPOINT and d["parameters"] == {"stage": name}
        assert d["work_pool"]["name"] == STAGES[name].pool
        assert d["work_pool"]["job_variables"]["working_dir"] == "."
    assert {n for n, d in got.items() if d["work_pool"]["name"] == "cpu"} == {"ingest", "embed", "tokenize"}
    assert got["backbone"]["work_pool"]["job_variables"]["env"] == {"GRC_DEVICE": "cuda"}
    assert "env" not in got["ingest"]["work_pool"]["job_variables"]


def test_the_pool_device_reaches_every_device_key_a_stage_declares():
    raw = load_params().raw
    # mine declares mine.device and the whole backbone section (its fold backbones train)
    assert deployments.device_keys(raw, "mine") == ["backbone.train.device", "mine.device"]
    assert deployments.device_keys(raw, "evaluate") == ["evaluate.device"]  # backbone.train.seed: no device
    assert deployments.device_keys(raw, "tokenize") == ["tokenize.rqvae.device"]
    assert deployments.device_keys(raw, "ingest") == []
    assert deployments.device_overrides(raw, "sft", "cuda") == ["sft.train.device=cuda"]
    assert deployments.device_overrides(raw, "sft", "") == []
    for name in STAGES:
        for key in deployments.device_keys(raw, name):  # each is a real key the loader accepts
            load_params(None, [f"{key}=cpu"])


def test_each_input_is_made_by_one_declared_stage():
    producer = deployments.producer
    assert producer("backbone/model.safetensors") == "backbone"
    assert producer("sft") == "sft" and producer("sft/grc/model.safetensors") == "sft"
    assert producer("eval/leaderboard.json") == "evaluate"
    assert producer("splits") == "ingest" and producer("no/such") is None
    for st in STAGES.values():
        for rel in st.inputs:
            assert producer(rel) not in (None, st.name), (st.name, rel)


def test_the_lock_record_survives_the_artifact():
    entry = {"cmd": "python -m flows.backbone", "outs": [
        {"path": "data/tiny/backbone", "hash": "md5", "md5": "ab.dir", "size": 10, "nfiles": 2}]}
    record = {"lock": entry, "result": {"best_epoch": 2, "best_valid_recall@10": 0.25},
              "pull": {"targets": ["data/tiny/splits"], "bytes": 5, "seconds": 0.5}}
    text = lock_markdown("backbone", record)
    assert "| `data/tiny/backbone` | ab.dir | 10 |" in text
    assert record_from_markdown(text) == record


def test_on_pools_a_stage_runs_after_the_stages_that_make_its_inputs():
    order = deployments.dependency_order(list(STAGES))
    assert sorted(order) == sorted(STAGES) and order[0] == "ingest"
    for i, name in enumerate(order):
        made_before = {deployments.producer(rel) for rel in STAGES[name].inputs}
        assert made_before <= set(order[:i]), name
    assert deployments.dependency_order(["evaluate", "backbone"]) == ["backbone", "evaluate"]
