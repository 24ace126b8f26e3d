"""TIGER's test Recall@10 after every epoch, beside the validation figure that selects the model.

    python -m benchmarks.offload_backbone export --name ins_curve --data insfull --with-test \
        -S data.dataset=instruments -S backbone.valid_users=0 -S backbone.train.epochs=20 -S backbone.train.patience=0
    python -m benchmarks.tiger_test_curve --name ins_curve [--src .offload] [--beam 20]

Trains the stage's backbone with the stage's loop (`grc_core.train.fit`, same loss, same
selection on validation Recall@10) from an `offload_backbone export`, and after every epoch also
ranks the test split. The test figures are logged for analysis only: they never select anything.
From the curve one reads (a) what selection on the whole validation split picks, and (b) the best
test Recall@10 any epoch reached, an upper bound on what any selection rule could get from this
run. Checkpoints go to `<src>/<name>_curve/` and a rerun resumes from them (the trainer state
keeps every epoch's record, so a resumed run reports all epochs).
JSON and plot: `benchmarks/results/tiger_test_curve_<name>.{json,png}`. The run ends by packing its checkpoints
as `offload_backbone train` does (`<src>/<name>_curve.tar`): since the per-epoch test ranking
changes neither the weights nor the kept epoch, `offload_backbone unpack` hands them to the stage,
which resumes with nothing left to train, and `flows.evaluate` gives the reported test figures.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

from benchmarks.offload_backbone import load_export, pack
from grc_core.data import to_batch
from grc_core.evaluation import rank_with_backbone, ranking_metrics
from grc_core.model import sequence_loss
from grc_core.train import fit, format_record
from tasks.checkpoints import Checkpointer
from tasks.io import write_json
from tasks.report import pyplot, save_png

RESULTS = Path(__file__).resolve().parent / "results"


def plot(records: list[dict], title: str, path: Path) -> None:
    """Validation and test Recall@10 per epoch, the kept epoch marked."""
    epochs = [r["epoch"] for r in records]
    fig, ax = pyplot().subplots(figsize=(6, 3.6))
    ax.plot(epochs, [r["valid_recall@10"] for r in records], marker="o", label="validation (selects)")
    ax.plot(epochs, [r["test_recall@10"] for r in records], marker="s", label="test (analysis only)")
    best = max(records, key=lambda r: r["valid_recall@10"])
    ax.axvline(best["epoch"], color="grey", linestyle=":", label=f"kept: epoch {best['epoch']}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("Recall@10")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_png(fig, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--name", required=True, help="an `offload_backbone export --with-test` config name")
    p.add_argument("--src", type=Path, default=Path(".offload"))
    p.add_argument("--beam", type=int, default=20, help="beam for the per-epoch validation and test ranking")
    args = p.parse_args(argv)
    meta, table, trie, split, cfg, model = load_export(args.name, args.src, torch.device("cpu"))
    if "test" not in split:
        raise SystemExit(f"{args.src / meta['data']}.npz has no test split: export it with --with-test")
    work = args.src / f"{args.name}_curve"
    work.mkdir(parents=True, exist_ok=True)

    def loss_fn(m: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
        batch = to_batch(split["train"].select(idx), table)
        return sequence_loss(m(batch), batch.target_codes)

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        out = {}
        for name in ("valid", "test"):
            ranked, _ = rank_with_backbone(m, split[name], table, trie, args.beam, meta["eval_batch_size"],
                                           exclude_history=meta["exclude_history"])
            metrics = ranking_metrics(ranked, split[name].target.numpy(), ks=(5, 10, 20))[0]
            out.update({(k if name == "valid" else f"test_{k}"): v for k, v in metrics.items()})
        return out

    def log(record: dict) -> None:
        print(args.name, format_record(record), flush=True)

    t0 = time.perf_counter()
    # The stage's fingerprint: the test ranking draws no random numbers and selects nothing, so the
    # weights and the kept epoch are the stage's own, and the checkpoint can be handed to it.
    state = fit(model, len(split["train"]), loss_fn, evaluate, cfg, Checkpointer(work / "ckpt", meta["fingerprint"]),
                select="recall@10", log=log)
    # fit prefixes evaluate's keys with "valid_": the test ones arrive as "valid_test_...".
    records = [{k.replace("valid_test_", "test_"): v for k, v in r.items()} for r in state.history]
    report = dict(
        command="python -m benchmarks.tiger_test_curve " + " ".join(sys.argv[1:] if argv is None else argv),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=dict(platform=platform.platform(), cpu_count=os.cpu_count(), torch=torch.__version__),
        config=meta, beam=args.beam, valid_users=len(split["valid"]), test_users=len(split["test"]),
        wall_s_this_run=round(time.perf_counter() - t0, 1), best_epoch=state.best_epoch,
        best_valid_recall10=state.best_metric, epochs=records,
    )
    out = RESULTS / f"tiger_test_curve_{args.name}.json"
    write_json(out, report)
    plot(records, f"TIGER {args.name}: Recall@10 per epoch (beam {args.beam})", out.with_suffix(".png"))
    pack(work / "ckpt", {k: report[k] for k in ("command", "date", "best_epoch", "best_valid_recall10")},
         args.src / f"{args.name}_curve.tar")
    print(f"wrote {out}; checkpoints for the stage: python -m benchmarks.offload_backbone unpack "
          f"--tar {args.src / f'{args.name}_curve.tar'} --name {args.name} --src {args.src}")


if __name__ == "__main__":
    main()
