"""Decode cost of the history window: full-width batches against batches cut to their longest
history, users taken shortest history first (grc_core/data.py `to_batch`, `by_history_length`).

    python -m benchmarks.history_trim --dataset scientific --windows 20 50 --users 2048

Histories: the dataset's test histories (every item before each user's last, the last `window` of
them), from its source files through the ingest stage's own reader and `build_splits` (the path
in params.yaml; nothing is stored). Model: params.yaml's `backbone.model` with random weights from
`--seed`, built for the window; catalog: random distinct IDs of `tokenize.rqvae.num_levels` levels
of `codebook_size` codes for the dataset's items, and their trie. Decoding: the constrained beam
search at `evaluate.beam`, batches of `evaluate.batch_size`, `--threads` threads, history items
excluded, on `--users` users drawn at random with `--seed` (all users where it is 0).
- `full`: what `rank_with_backbone` did before 2026-12-05: batches in the users' order, every row
  padded to the window.
- `trimmed`: `rank_with_backbone` now: users shortest history first, each batch cut to its longest
  history (positions counted from the end of the window, so every row means the same).
Parity: the teacher-forced log-probs of every user's target, trimmed against full width, within
1e-4 (the script fails otherwise). The two rankings are compared and the differences counted
(`compare`): random weights make many near-ties, which float order breaks, and a near-tie at a
level's pruning boundary can change what the beam finds further down.
Figures: users/s of each path (decoding only, after one warm-up batch, the best of `--repeats`
runs taken in turns), the speed-up, and the mean batch width of the trimmed path.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, replace

import numpy as np
import torch

from benchmarks.common import commit, save, stamp
from grc_core.beam_search import beam_search
from grc_core.data import ItemTable, by_history_length, history_mask, make_instances, to_batch
from grc_core.evaluation import rank_with_backbone
from grc_core.model import BackboneStepper, Seq2Seq
from grc_core.trie import PrefixTrie
from tasks.ingest import build_splits, read_source
from tasks.params import load_params


TIE_TOL = 1e-4  # score gap below which two items' order is float order's (random weights give many)


@torch.inference_mode()
def rank_full_width(model, inst, table, trie, beam, batch_size):
    """The ranking loop as it was: users in order, every batch as wide as the window."""
    stepper, items, scores = BackboneStepper(model), [], []
    for start in range(0, len(inst), batch_size):
        part = inst.select(torch.arange(start, min(start + batch_size, len(inst))))
        res = beam_search(stepper, to_batch(part, table, with_target=False, trim=False), trie, beam,
                          exclude=history_mask(part.history, table.codes.shape[0]))
        items.append(res.items.numpy())
        scores.append(res.scores.float().numpy())
    return np.concatenate(items), np.concatenate(scores)


def compare(a_items, a_scores, b_items, b_scores, tol=TIE_TOL) -> dict:
    """How two rankings of the same users differ: users with identical lists, ranks that differ,
    the largest score gap rank by rank, whether -inf (a beam with no valid item) is in the same
    places, and `unexplained`: ranks whose item is not a near-tie swap (in the other list at a rank
    whose score is within `tol` of its own, or absent with its score within `tol` of that list's
    last finite one). A beam search prunes at every level, so a near-tie at a pruning boundary,
    which float order decides, can let another item in further down: such ranks are unexplained
    too, and `logp_gap` is what shows that the model computes the same thing."""
    fin = np.isfinite(a_scores)
    same_inf = bool((fin == np.isfinite(b_scores)).all())
    gap = float(np.abs(np.where(fin, a_scores, 0.0) - np.where(fin, b_scores, 0.0)).max())
    unexplained = 0
    differs = (a_items != b_items) & fin
    for u, r in zip(*np.nonzero(differs)):
        where = np.nonzero((b_items[u] == a_items[u, r]) & fin[u])[0]
        near = (b_scores[u, where[0]] if len(where) else b_scores[u][fin[u]][-1])
        unexplained += int(abs(near - a_scores[u, r]) > tol)
    return {"identical_users": int((~differs.any(1)).sum()), "swapped_ranks": int(differs.sum()),
            "max_score_gap": gap, "same_dead_beams": same_inf, "unexplained": unexplained}


@torch.inference_mode()
def logp_gap(model, inst, table, batch_size) -> float:
    """Largest difference, over users and levels, between the teacher-forced log-probs of each
    user's target from a trimmed batch (taken shortest history first) and from the full-width one."""
    gap, order = 0.0, by_history_length(inst)
    for start in range(0, len(inst), batch_size):
        part = inst.select(order[start:start + batch_size])
        trimmed, full = (model(to_batch(part, table, trim=t)) for t in (True, False))
        gap = max(gap, max(float((torch.log_softmax(a, -1) - torch.log_softmax(b, -1)).abs().max())
                           for a, b in zip(trimmed, full)))
    return gap


def timed(paths: dict, warm, inst, repeats: int) -> tuple[dict, dict]:
    """Each path's output on `inst` and its best wall time over `repeats` runs, the paths taking
    turns so that a slow spell of the machine falls on both."""
    out, best = {}, {}
    for name, fn in paths.items():
        fn(warm)
    for _ in range(repeats):
        for name, fn in paths.items():
            start = time.perf_counter()
            out[name] = fn(inst)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    return out, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="scientific")
    ap.add_argument("--windows", type=int, nargs="+", default=[20, 50])
    ap.add_argument("--users", type=int, default=2048, help="test users decoded (0: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per path (the best counts)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(None, [f"data.dataset={args.dataset}"])
    ev, rq = params.evaluate, params.tokenize.rqvae
    raw = read_source.fn(params.dataset)
    n_items = raw.items.height
    rng = np.random.default_rng(args.seed)
    codes = rng.choice(rq.codebook_size ** rq.num_levels, n_items, replace=False)  # distinct IDs
    ids = np.stack([(codes // rq.codebook_size ** (rq.num_levels - 1 - j)) % rq.codebook_size
                    for j in range(rq.num_levels)], 1)
    sizes = [rq.codebook_size] * rq.num_levels
    table = ItemTable(torch.as_tensor(ids), torch.zeros(n_items, 0, dtype=torch.long))
    trie = PrefixTrie.from_ids(ids, sizes)
    rows = []
    for window in args.windows:
        test = build_splits(raw.interactions, window)["test"]
        pick = (np.arange(test.height) if not args.users or args.users >= test.height
                else np.sort(rng.choice(test.height, args.users, replace=False)))
        test = test[pick]
        inst = make_instances(test["user_id"].to_list(), test["history"].to_list(), test["target"].to_list(), window)
        lengths = (inst.history >= 0).sum(1)
        torch.manual_seed(args.seed)
        model = Seq2Seq(replace(params.backbone.model, max_history=window), sizes, []).eval()
        warm = inst.select(torch.arange(min(ev.batch_size, len(inst))))
        out, secs = timed({"full": lambda x: rank_full_width(model, x, table, trie, ev.beam, ev.batch_size),
                           "trimmed": lambda x: rank_with_backbone(model, x, table, trie, ev.beam, ev.batch_size,
                                                                   exclude_history=True)}, warm, inst, args.repeats)
        (full_items, full_scores), (trim_items, trim_scores) = out["full"], out["trimmed"]
        full_s, trim_s = secs["full"], secs["trimmed"]
        parity = {"max_logp_gap": logp_gap(model, inst, table, ev.batch_size),
                  **compare(full_items, full_scores, trim_items, trim_scores)}
        if parity["max_logp_gap"] > TIE_TOL:
            raise SystemExit(f"window {window}: the trimmed batches give other log-probs than the full-width "
                             f"ones: {parity}")
        order = by_history_length(inst)
        widths = [int(lengths[order[s:s + ev.batch_size]].max()) for s in range(0, len(inst), ev.batch_size)]
        rows.append({"window": window, "users": len(inst), "mean_history": float(lengths.float().mean()),
                     "share_longer_than_20": float((lengths > 20).float().mean()),
                     "full_users_per_s": len(inst) / full_s, "trimmed_users_per_s": len(inst) / trim_s,
                     "speedup": full_s / trim_s, "mean_trimmed_width": float(np.mean(widths)),
                     **parity})
        print(f"window {window}: {len(inst)} users, mean history {rows[-1]['mean_history']:.1f}, "
              f"full {rows[-1]['full_users_per_s']:.1f} users/s, trimmed {rows[-1]['trimmed_users_per_s']:.1f} "
              f"users/s ({rows[-1]['speedup']:.2f}x; mean batch width {rows[-1]['mean_trimmed_width']:.1f}), "
              f"log-prob gap {parity['max_logp_gap']:.1e}; {parity['identical_users']} of {len(inst)} lists "
              f"identical, {parity['unexplained']} ranks not near-tie swaps", flush=True)
    payload = {**stamp({"dataset": args.dataset, "windows": args.windows, "users": args.users, "beam": ev.beam,
                        "batch_size": ev.batch_size, "threads": args.threads, "seed": args.seed,
                        "repeats": args.repeats, "model": asdict(params.backbone.model), "levels": sizes}),
               "commit": commit(), "rows": rows}
    print(save(args.out or f"history_trim_{args.dataset}", payload))


if __name__ == "__main__":
    main()
