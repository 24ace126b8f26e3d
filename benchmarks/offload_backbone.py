"""Train backbones on another machine (a GPU worker) and resume them here as the `backbone` stage.

The training loop is `grc_core.train.fit`, the same one the stage runs; only the tensors travel:

    # here: write the stage's inputs (instances, item table, configs, fingerprint) to one folder
    python -m benchmarks.offload_backbone export --name sci_s1 --data sci --out .offload \
        -S data.dataset=scientific -S data.data_dir=data_s1 -S backbone.train.seed=2027 ...
    # on the worker (needs torch, numpy, safetensors, grc_core; not prefect/polars/duckdb):
    python -m benchmarks.offload_backbone train --name sci_s1 --src .offload --out $OUT --device cuda
    # here: unpack the checkpoints into the stage's ckpt dir, then run the stage with the same -S:
    python -m benchmarks.offload_backbone unpack --tar sci_s1.tar --name sci_s1 --src .offload
    python -m flows.backbone -S ... (same overrides)   # resumes from `last/`, finds training done

The checkpoint carries the fingerprint computed here from the stage's params and data, so the
stage accepts it; `offload.json` beside it records where and on what device it was trained.
Runs that share `--data` share one tensor file (`<data>.npz`); each `--name` is one config.
The optimizer moments are not brought back (the run is finished; `fit` resumes without them).
`--test-beam B` additionally ranks the test split on the worker (for comparing variants there;
reported figures come from the `evaluate` stage here).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tarfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from grc_core.data import Instances, ItemTable
from grc_core.evaluation import rank_with_backbone, ranking_metrics
from grc_core.config import ModelConfig, TrainConfig
from grc_core.model import Seq2Seq
from grc_core.train import fit_seq2seq, format_record
from grc_core.trie import PrefixTrie
from tasks.checkpoints import Checkpointer


def export(name: str, data: str, out: Path, overrides: list[str], with_test: bool) -> None:
    from tasks.artifacts import load_item_table, load_split, subset  # the stage's own readers
    from tasks.params import load_params
    from tasks.stages import fingerprint as stage_fingerprint

    params = load_params(overrides=overrides)
    bb, data_dir = params.backbone, params.dataset_dir()
    if bb.cf_distill > 0 or bb.cf_prior > 0:  # the export carries no SASRec: train such a backbone with the stage itself
        raise SystemExit("offload_backbone: backbone.cf_distill or cf_prior > 0 is not exported (no SASRec on the worker); "
                         "run flows.backbone (or tasks.ddp) on the worker instead")
    table, level_sizes, attr_sizes = load_item_table(data_dir, params.dataset.attributes)
    train = load_split(data_dir, "train", params.data.max_history)
    valid = subset(load_split(data_dir, "valid", params.data.max_history), bb.valid_users, bb.train.seed)
    arrays = {"codes": table.codes, "attrs": table.attrs, "train_user": train.user, "train_history": train.history,
              "train_target": train.target, "valid_user": valid.user, "valid_history": valid.history,
              "valid_target": valid.target}
    if with_test:
        test = load_split(data_dir, "test", params.data.max_history)
        arrays.update(test_user=test.user, test_history=test.history, test_target=test.target)
    fingerprint = stage_fingerprint(params, "backbone")  # the stage's own: it resumes from what this trains
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"{data}.tmp.npz"
    np.savez_compressed(tmp, **{k: v.numpy().astype(np.int32) for k, v in arrays.items()})
    tmp.replace(out / f"{data}.npz")
    meta = {"model": asdict(bb.model), "train": asdict(bb.train), "valid_beam": bb.valid_beam,
            "eval_batch_size": bb.eval_batch_size, "exclude_history": params.data.exclude_history,
            "level_sizes": level_sizes, "attr_sizes": attr_sizes, "fingerprint": fingerprint,
            "ckpt_dir": str(data_dir / "backbone" / "ckpt"), "overrides": overrides, "data": data}
    (out / f"{name}.json").write_text(json.dumps(meta, indent=2))
    print(f"{name}: {len(train)} train, {len(valid)} valid instances -> {out / data}.npz, {out / name}.json")


def load_export(name: str, src: Path, dev: torch.device) -> tuple[dict, ItemTable, PrefixTrie, dict[str, Instances],
                                                                   TrainConfig, Seq2Seq]:
    """An `export`ed config: its meta, item table, trie, splits, train config and a freshly seeded model."""
    meta = json.loads((src / f"{name}.json").read_text())
    with np.load(src / f"{meta['data']}.npz", allow_pickle=False) as z:
        arr = {k: torch.from_numpy(z[k].astype(np.int64)) for k in z.files}
    table = ItemTable(arr["codes"], arr["attrs"]).to(dev)
    trie = PrefixTrie.from_ids(arr["codes"].numpy(), meta["level_sizes"]).to(dev)
    split = {s: Instances(arr[f"{s}_user"], arr[f"{s}_history"], arr[f"{s}_target"])
             for s in ("train", "valid", "test") if f"{s}_user" in arr}
    cfg = TrainConfig(**meta["train"])
    torch.manual_seed(cfg.seed)
    model = Seq2Seq(ModelConfig(**meta["model"]), meta["level_sizes"], meta["attr_sizes"], len(table.codes)).to(dev)
    return meta, table, trie, split, cfg, model


def train(name: str, src: Path, out: Path, device: str, test_beam: int) -> None:
    dev = torch.device(device)
    meta, table, trie, split, cfg, model = load_export(name, src, dev)

    def log(record: dict) -> None:
        print(name, format_record(record), flush=True)

    work = out / name
    t0 = time.perf_counter()
    state = fit_seq2seq(model, split["train"], split["valid"], table, trie, cfg, Checkpointer(work / "ckpt", meta["fingerprint"]),
                        meta["valid_beam"], meta["eval_batch_size"], meta["exclude_history"], log)
    wall = time.perf_counter() - t0
    info = {"name": name, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor(),
            "torch": torch.__version__, "wall_s": wall, "best_epoch": state.best_epoch,
            "best_valid_recall@10": state.best_metric, "epochs_run": state.epoch, "overrides": meta["overrides"],
            "fingerprint": meta["fingerprint"]}
    if test_beam and "test" in split:  # the model holds the best checkpoint's weights
        t1 = time.perf_counter()
        ranked, _ = rank_with_backbone(model, split["test"], table, trie, test_beam, meta["eval_batch_size"],
                                       exclude_history=meta["exclude_history"])
        info["test"] = ranking_metrics(ranked, split["test"].target.numpy())[0]
        info["test_beam"], info["test_s"] = test_beam, time.perf_counter() - t1
    pack(work / "ckpt", info, out / f"{name}.tar")
    shutil.rmtree(work)
    print(json.dumps(info), flush=True)


def pack(ckpt: Path, info: dict, tar_path: Path) -> None:
    """`ckpt/` (best/, last/ without the optimizer moments) and `offload.json` into one tar."""
    (ckpt / "offload.json").write_text(json.dumps(info, indent=2))
    (ckpt / "last" / "optimizer.safetensors").unlink(missing_ok=True)
    with tarfile.open(tar_path, "w") as tar:
        tar.add(ckpt, arcname="ckpt")


def unpack(tar_path: Path, name: str, src: Path) -> None:
    meta = json.loads((src / f"{name}.json").read_text())
    ckpt = Path(meta["ckpt_dir"])
    tmp = ckpt.with_name("ckpt.offload.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():  # our own archive, still checked: plain files under ckpt/ only
            if not (member.isfile() or member.isdir()) or member.name.startswith("/") or ".." in member.name:
                raise ValueError(f"{tar_path}: unexpected member {member.name!r}")
        tar.extractall(tmp, filter="data")
    old = ckpt.with_name("ckpt.old")
    shutil.rmtree(old, ignore_errors=True)
    if ckpt.exists():
        ckpt.replace(old)
    (tmp / "ckpt").replace(ckpt)
    shutil.rmtree(tmp)
    shutil.rmtree(old, ignore_errors=True)
    print(f"{name}: checkpoints in {ckpt}; now run its stage with the same overrides: {' '.join(meta['overrides'])}")


def offload_parser(doc: str | None, data_help: str) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser,
                                                           argparse.ArgumentParser, argparse.ArgumentParser]:
    """The `export` / `train` / `unpack` command line shared by the offload scripts (extras added by each)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("--name", required=True)
    e.add_argument("--data", required=True, help=data_help)
    e.add_argument("--out", type=Path, default=Path(".offload"))
    e.add_argument("-S", dest="overrides", action="append", default=[])
    t = sub.add_parser("train")
    t.add_argument("--name", required=True)
    t.add_argument("--src", type=Path, default=Path(".offload"))
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--device", default="cuda")
    u = sub.add_parser("unpack")
    u.add_argument("--tar", type=Path, required=True)
    u.add_argument("--name", required=True)
    u.add_argument("--src", type=Path, default=Path(".offload"))
    return ap, e, t, u


def dispatch(a: argparse.Namespace, do_export: Callable[[], None], do_train: Callable[[], None]) -> None:
    """Run the subcommand `a.cmd` of an `offload_parser` command line."""
    if a.cmd == "export":
        do_export()
    elif a.cmd == "train":
        do_train()
    else:
        unpack(a.tar, a.name, a.src)


def main(argv: list[str] | None = None) -> None:
    ap, e, t, _ = offload_parser(__doc__, "tensor file name, shared by runs on the same data")
    e.add_argument("--with-test", action="store_true")
    t.add_argument("--test-beam", type=int, default=0)
    a = ap.parse_args(argv)
    dispatch(a, lambda: export(a.name, a.data, a.out, a.overrides, a.with_test),
             lambda: train(a.name, a.src, a.out, a.device, a.test_beam))


if __name__ == "__main__":
    main(sys.argv[1:])
