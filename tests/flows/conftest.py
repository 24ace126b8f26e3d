"""Fixtures for flow tests: a tiny synthetic dataset and a copy of the project that runs against the
session's Prefect server (`prefect_server`, tests/conftest.py)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def __getattr__(name: str):
    # The session's Prefect server is one fixture of tests/conftest.py, for tests/flows and tests/tasks alike.
    # A module that imports it from here still works, but defines a fixture of its own: a second server.
    if name == "prefect_server":
        from tests.conftest import prefect_server
        return prefect_server
    raise AttributeError(name)


def write_synthetic_lcrec(root: Path, prefix: str = "Tiny", n_users: int = 40, n_cats: int = 5,
                          per_cat: int = 8, seed: int = 0) -> dict:
    """Items in categories with distinct text; each user mostly buys within one category."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    words = ["pipette", "beaker", "magnet", "sensor", "glove", "lens", "valve", "clamp"]
    items, cat_of = {}, []
    for c in range(n_cats):
        for j in range(per_cat):
            iid = len(items)
            items[str(iid)] = {"title": f"{words[c]} model {j} for lab work", "description": f"a {words[c]}",
                               "brand": f"Brand{j % 3}", "categories": f"Lab,{words[c].title()}s"}
            cat_of.append(c)
    inter = {}
    for u in range(n_users):
        c = u % n_cats
        length = int(rng.integers(5, 9))
        pool = [i for i, k in enumerate(cat_of) if k == c]
        inter[str(u)] = [int(rng.choice(pool)) if rng.random() < 0.85 else int(rng.integers(0, len(items)))
                         for _ in range(length)]
    (root / f"{prefix}.item.json").write_text(json.dumps(items))
    (root / f"{prefix}.inter.json").write_text(json.dumps(inter))
    return {"users": n_users, "items": len(items), "interactions": sum(len(v) for v in inter.values())}


TINY_OVERRIDES = [
    "tokenize.rqvae.num_levels=2", "tokenize.rqvae.codebook_size=8", "tokenize.rqvae.epochs=20",
    "tokenize.rqvae.batch_size=64", "tokenize.rqvae.hidden_dims=[64, 32]", "tokenize.rqvae.latent_dim=16",
    "backbone.train.epochs=2", "backbone.train.batch_size=32", "backbone.train.warmup_steps=5",
    "backbone.valid_beam=10", "backbone.valid_users=0", "evaluate.beam=20",
    "sasrec.epochs=2", "sasrec.hidden=16", "sasrec.batch_size=16",
    "mine.beam=10", "mine.top=2", "mine.sampled=2", "mine.batch_size=32", "mine.crossfit_folds=2",
    "sft.train.epochs=1", "sft.train.batch_size=8", "sft.train.warmup_steps=5", "sft.valid_beam=10",
    "sft.valid_users=0", "evaluate.correct_width=10",
    "grpo.loop.iterations=3", "grpo.loop.users_per_step=8", "grpo.rollout.group_size=4", "grpo.loop.eval_every=2",
    "grpo.valid_beam=10",
    "grpo.valid_users=0", "vstar.value.level_weights=[0.3, 0.5, 1.0]", "vstar.value.steps=2",
    "vstar.loop.iterations=3", "vstar.loop.eval_every=2", "vstar.valid_beam=10", "vstar.valid_users=0",
    "vstar.ved_test.candidates=20", "candidates.top_n=10", "candidates.beam=20", "candidates.users_per_shard=16",
]
COPIED = ["flows", "tasks", "grc_core", "dvc.yaml", "params.yaml"]


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory, prefect_server):
    """A copy of the project code whose params.yaml points at the tiny synthetic dataset with
    TINY_OVERRIDES; `env` runs its commands against the session's Prefect server."""
    import shutil

    import yaml

    from tasks.params import apply_override

    root = tmp_path_factory.mktemp("project")
    for name in COPIED:
        src = PROJECT_ROOT / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, root / name)
    counts = write_synthetic_lcrec(root / "source")
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["datasets"]["tiny"] = {"format": "lcrec", "path": str(root / "source"), "prefix": "Tiny",
                               "attributes": ["category", "brand"]}
    for text in ["data.dataset=tiny", *TINY_OVERRIDES]:
        apply_override(raw, text)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "PREFECT_API_URL": prefect_server["url"],
           "PREFECT_HOME": str(prefect_server["home"]), "DVC_NO_ANALYTICS": "1"}
    return {"root": root, "counts": counts, "env": env}
