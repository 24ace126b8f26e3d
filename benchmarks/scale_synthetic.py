"""Synthetic scale benchmark: tokenizer, valid-prefix table, candidate generation and training
throughput at 1 million items and 1 million users (issue 8).

    nice -n 10 python -m benchmarks.scale_synthetic [--items 1000000] [--users 1000000] [-S key=value ...]

Data, generated in chunks with planted structure (nothing is read from disk):
- Items: 128-d unit vectors from a two-level Gaussian mixture: `--top-clusters` (256) top
  centres ~ N(0, I); 16 sub-centres per top centre at N(top, 0.5^2 I); an item is a uniformly
  drawn sub-centre plus N(0, 0.25^2 I), L2-normalised like a sentence embedding. The mixture
  gives the residual quantiser a coarse and a fine level to find.
- Users: 3 + Poisson(17) interactions (mean 20). Each user has 1-3 home top clusters (drawn
  with Zipf(1) weights over clusters, so some clusters are popular); each interaction is, with
  probability 0.9, an item of a home cluster (within a cluster, popularity falls as u^2 over the
  cluster's items) and otherwise a uniformly random item. `home_share` reports the realised share.

Parts, each timed with the 1-minute load average at its start and end (another job shares the
two cores, so wall times are upper bounds; CPU seconds are given where they help):
1. Tokenizer (`--tokenizer-threads`, 1), as `tokenize` does it, with params from params.yaml
   (`tokenize.rqvae`): RQ-VAE k-means init, `--rqvae-epochs` epochs (each with its dead-code
   restart), the assignment of every item (`encode_codes`); the 50-epoch cost is an
   extrapolation from these, never run.
   Residual k-means (`tokenize.method=rkmeans`) with `kmeans_iters` Lloyd steps, and its
   assignment. For both: collisions, the last-level re-assignment and the disambiguation level.
2. The valid-prefix table (`PrefixTrie`) over the IDs of `--ids` (rqvae): build time, bytes of
   its tensors (each level dense or csr by `PrefixTrie`'s size rule), RSS delta; the same for the
   first 1/8, 1/4, 1/2 of the items (growth); and the bytes with every level csr.
3. Candidate generation: the backbone of `backbone.model` size with random weights (throughput
   does not depend on the weights; quality is not measured), `rank_with_backbone(...,
   exclude_history=True)` as the candidate dump runs it, batch `candidates.batch_size`, for each
   thread count and beam; one run without history exclusion shows what the (B, N) mask costs.
4. Backbone training (forward, backward, fused AdamW) on synthetic prefixes of the user
   sequences, batch `backbone.train.batch_size`.
Peak RSS per part: VmHWM after resetting it at the part's start (/proc/self/clear_refs); it
includes whatever the process still held from earlier parts (given as rss_start_mib).
Writes benchmarks/results/scale_synthetic.json (or --out).
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import resource
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch

from benchmarks.common import RESULTS, stamp
from grc_core import semantic_ids as sid
from grc_core.data import Instances, ItemTable, to_batch
from grc_core.evaluation import rank_with_backbone
from grc_core.kmeans import make_generator, residual_kmeans, residual_quantise
from grc_core.model import Seq2Seq, count_flops_per_sample, sequence_loss
from grc_core.rqvae import RQVAE, RQVAEConfig, code_utilisation, encode_codes, init_codebooks_kmeans, \
    restart_dead_codes, train_epoch
from grc_core.train import TrainConfig, make_optimizer
from grc_core.trie import PrefixTrie
from tasks.io import write_json
from tasks.params import Params, load_params

DIM = 128
SUB_PER_TOP = 16
HOME_P = 0.9
CHUNK = 131_072


# ---- memory and timing ------------------------------------------------------------------------

def _status_mib(field: str) -> float:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return float("nan")
    m = re.search(rf"{field}:\s+(\d+) kB", text)
    return int(m.group(1)) / 1024 if m else float("nan")


def rss_mib() -> float:
    return _status_mib("VmRSS")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@contextmanager
def part(record: dict) -> Iterator[dict]:
    """Time a block into `record`: wall and CPU seconds, load average and RSS at start and end, peak RSS."""
    gc.collect()
    resettable = reset_peak()
    record.update(load_avg_start=round(os.getloadavg()[0], 2), rss_start_mib=round(rss_mib(), 1))
    t0, c0 = time.perf_counter(), time.process_time()
    yield record
    record.update(wall_s=round(time.perf_counter() - t0, 3), cpu_s=round(time.process_time() - c0, 3),
                  load_avg_end=round(os.getloadavg()[0], 2), rss_end_mib=round(rss_mib(), 1),
                  peak_rss_mib=round(_status_mib("VmHWM"), 1) if resettable else None)


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, round(time.perf_counter() - t0, 3)


# ---- synthetic data ---------------------------------------------------------------------------

class Catalog(NamedTuple):
    embeddings: np.ndarray  # (N, D) float32, unit norm
    top: np.ndarray  # (N,) int32 top cluster of each item
    by_top: np.ndarray  # (N,) int64 items sorted by top cluster
    top_start: np.ndarray  # (C+1,) offsets of each top cluster in by_top


class Sequences(NamedTuple):
    items: np.ndarray  # (I,) int32 item ids, users one after another in time order
    offsets: np.ndarray  # (U+1,) int64 start of each user's sequence
    home_share: float  # realised share of interactions in a home cluster

    def user(self, u: int) -> np.ndarray:
        return self.items[self.offsets[u]:self.offsets[u + 1]]


def make_catalog(n_items: int, top_clusters: int, seed: int) -> Catalog:
    """Two-level Gaussian mixture on the unit sphere, generated in chunks of CHUNK items."""
    rng = np.random.default_rng(seed)
    tops = rng.standard_normal((top_clusters, DIM)).astype(np.float32)  # (C, D)
    subs = (np.repeat(tops, SUB_PER_TOP, 0)
            + 0.5 * rng.standard_normal((top_clusters * SUB_PER_TOP, DIM)).astype(np.float32))  # (C*16, D)
    sub_of = rng.integers(0, len(subs), n_items)  # (N,)
    out = np.empty((n_items, DIM), dtype=np.float32)
    for start in range(0, n_items, CHUNK):
        s = sub_of[start:start + CHUNK]
        x = subs[s] + 0.25 * rng.standard_normal((len(s), DIM), dtype=np.float32)  # (n, D)
        out[start:start + CHUNK] = x / np.linalg.norm(x, axis=1, keepdims=True)
    top = (sub_of // SUB_PER_TOP).astype(np.int32)
    by_top = np.argsort(top, kind="stable")
    top_start = np.searchsorted(top[by_top], np.arange(top_clusters + 1))
    return Catalog(out, top, by_top, top_start)


def make_sequences(cat: Catalog, n_users: int, mean_len: int, seed: int) -> Sequences:
    """Users who mostly stay within 1-3 home clusters; generated in chunks of CHUNK users."""
    rng = np.random.default_rng(seed + 1)
    n_items, n_top = len(cat.top), len(cat.top_start) - 1
    zipf = 1.0 / np.arange(1, n_top + 1)
    cluster_p = zipf[rng.permutation(n_top)] / zipf.sum()  # popular clusters are not the low ids
    sizes = np.diff(cat.top_start)
    lengths = 3 + rng.poisson(mean_len - 3, n_users)  # (U,)
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    items = np.empty(offsets[-1], dtype=np.int32)
    home_hits = 0
    for start in range(0, n_users, CHUNK):
        lens = lengths[start:start + CHUNK]
        homes = rng.choice(n_top, size=(len(lens), 3), p=cluster_p)  # (u, 3)
        n_home = rng.integers(1, 4, len(lens))  # (u,)
        owner = np.repeat(np.arange(len(lens)), lens)  # (i,) user of each interaction
        pick = homes[owner, (rng.random(len(owner)) * n_home[owner]).astype(np.int64)]  # (i,)
        within = (sizes[pick] * rng.random(len(owner)) ** 2).astype(np.int64)  # (i,) popular first
        chosen = cat.by_top[cat.top_start[pick] + np.minimum(within, sizes[pick] - 1)]
        stray = rng.random(len(owner)) >= HOME_P
        chosen[stray] = rng.integers(0, n_items, int(stray.sum()))
        active = np.arange(3)[None, :] < n_home[owner][:, None]  # (i, 3) the user's first n_home homes
        home_hits += int(((cat.top[chosen][:, None] == homes[owner]) & active).any(1).sum())
        items[offsets[start]:offsets[start + len(lens)]] = chosen
    return Sequences(items, offsets, home_hits / len(items))


def last_item_instances(seqs: Sequences, users: np.ndarray, max_len: int) -> Instances:
    """History = all but the last item (its last max_len), target = the last item: as the test split."""
    hist = np.full((len(users), max_len), -1, dtype=np.int64)
    target = np.empty(len(users), dtype=np.int64)
    for i, u in enumerate(users):
        s = seqs.user(int(u))
        h = s[:-1][-max_len:]
        hist[i, max_len - len(h):] = h
        target[i] = s[-1]
    return Instances(torch.as_tensor(users, dtype=torch.long), torch.from_numpy(hist), torch.from_numpy(target))


def prefix_instances(seqs: Sequences, n: int, max_len: int, seed: int) -> Instances:
    """n training instances: a random user, a random position t >= 1, history the up-to-max_len items before t."""
    rng = np.random.default_rng(seed + 2)
    users = rng.integers(0, len(seqs.offsets) - 1, n)
    start, lens = seqs.offsets[users], np.diff(seqs.offsets)[users]
    t = 1 + (rng.random(n) * (lens - 1)).astype(np.int64)  # (n,) target position
    pos = t[:, None] - max_len + np.arange(max_len)[None, :]  # (n, T) positions of the history slots
    hist = np.where(pos >= 0, seqs.items[start[:, None] + pos.clip(min=0)], -1).astype(np.int64)
    target = seqs.items[start + t].astype(np.int64)
    return Instances(torch.from_numpy(users), torch.from_numpy(hist), torch.from_numpy(target))


# ---- 1. tokenizer -----------------------------------------------------------------------------

def id_quality(base: np.ndarray, distances: np.ndarray | None, k: int,
               dedup: bool) -> tuple[dict, np.ndarray, list[int]]:
    """Collisions, re-assignment and disambiguation as tasks/tokenize.py does them: (record, ids, level sizes)."""
    rec: dict = {"collision_rate_before": sid.collision_rate(base),
                 "utilisation": [round(u, 4) for u in code_utilisation(base, k)]}
    codes = base
    if dedup and distances is not None:
        codes, rec["reassign_s"] = timed(sid.reassign_last_level, base, distances)
    rec["collision_rate_after_reassign"] = sid.collision_rate(codes)
    (ids, extra), rec["disambiguate_s"] = timed(sid.disambiguate, codes)
    rec.update(extra_level_size=int(extra), num_levels_total=int(ids.shape[1]),
               distinct_ids=int(len(np.unique(ids, axis=0))))
    return rec, ids, [k] * base.shape[1] + ([extra] if extra else [])


def bench_rqvae(x: torch.Tensor, cfg: RQVAEConfig, epochs: int, dedup: bool) -> tuple[dict, np.ndarray, list[int]]:
    """The steps of `train_rqvae`, each timed: k-means init, epochs with restarts, assignment of all items."""
    rec: dict = {"epochs_run": epochs}
    with part(rec):
        gen = make_generator(cfg.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = RQVAE(x.shape[1], cfg)
            _, rec["kmeans_init_s"] = timed(init_codebooks_kmeans, model, x, cfg.kmeans_iters, make_generator(cfg.seed))
            model.train()
            mlp = [p for n, p in model.named_parameters() if n != "codebooks"]
            opt = torch.optim.AdamW([{"params": mlp, "weight_decay": cfg.weight_decay},
                                     {"params": [model.codebooks], "weight_decay": 0.0}], lr=cfg.lr)
            rec["epoch_s"], rec["restart_s"], rec["history"] = [], [], []
            for _ in range(epochs):
                (terms, usage), dt = timed(train_epoch, model, x, opt, gen)
                rec["epoch_s"].append(dt)
                restarted, dt = timed(restart_dead_codes, model, x, usage, gen)
                rec["restart_s"].append(dt)
                rec["history"].append({**{k: round(v, 5) for k, v in terms.items()}, "restarted": restarted})
        enc, rec["assign_all_s"] = timed(encode_codes, model, x)
    epoch, restart = float(np.mean(rec["epoch_s"])), float(np.mean(rec["restart_s"]))
    rec["extrapolated_full_s"] = {
        "epochs": cfg.epochs,
        "total_s": round(rec["kmeans_init_s"] + cfg.epochs * epoch + (cfg.epochs - 1) * restart
                         + rec["assign_all_s"], 1),
        "formula": "kmeans_init + epochs x mean(epoch_s) + (epochs - 1) x mean(restart_s) + assign_all_s",
    }
    quality, ids, sizes = id_quality(enc.codes, enc.last_level_distances, cfg.codebook_size, dedup)
    rec.update(quality)
    return rec, ids, sizes


def bench_rkmeans(x: torch.Tensor, cfg: RQVAEConfig, dedup: bool) -> tuple[dict, np.ndarray, list[int]]:
    rec: dict = {"kmeans_iters": cfg.kmeans_iters}
    with part(rec):
        fit, rec["fit_s"] = timed(residual_kmeans, x, cfg.num_levels, cfg.codebook_size, cfg.kmeans_iters, cfg.seed)
        rq, rec["assign_all_s"] = timed(residual_quantise, x, fit.codebooks)
    base, dist = rq.codes.numpy(), rq.last_level_distances.numpy()
    rec["residual_sq_norm"] = round(float((rq.final_residual ** 2).sum(1).mean()), 5)
    del rq
    quality, ids, sizes = id_quality(base, dist, cfg.codebook_size, dedup)
    rec.update(quality)
    return rec, ids, sizes


# ---- 2. valid-prefix table --------------------------------------------------------------------

def csr_bytes(ids: np.ndarray, sizes: list[int]) -> int:
    """Bytes of the same trie with every level stored as csr (16 bytes per edge)."""
    return PrefixTrie.from_ids(ids, sizes, dense_max_bytes=0).nbytes


def bench_trie(ids: np.ndarray, sizes: list[int]) -> tuple[dict, PrefixTrie]:
    growth = []
    n = len(ids)
    for share in (8, 4, 2):
        t = PrefixTrie.from_ids(ids[: n // share], sizes)
        growth.append({"items": n // share, "nbytes": t.nbytes, "csr_bytes": csr_bytes(ids[: n // share], sizes)})
        del t
    rec: dict = {"level_sizes": sizes}
    with part(rec):
        trie = PrefixTrie.from_ids(ids, sizes)
    rec.update(nbytes=trie.nbytes, nbytes_mib=round(trie.nbytes / 2**20, 1),
               rss_delta_mib=round(rec["rss_end_mib"] - rec["rss_start_mib"], 1),
               nodes_per_level=[trie.num_nodes(level) for level in range(trie.num_levels + 1)],
               layouts=list(trie.layouts),
               table_mib_per_level=[round(trie.level_nbytes(level) / 2**20, 1) for level in range(trie.num_levels)])
    rec.update(csr_bytes=csr_bytes(ids, sizes), csr_mib=round(csr_bytes(ids, sizes) / 2**20, 1))
    rec["growth"] = [*growth, {"items": n, "nbytes": trie.nbytes, "csr_bytes": rec["csr_bytes"]}]
    return rec, trie


# ---- 3. candidate generation ------------------------------------------------------------------

def check_candidates(items: np.ndarray, inst: Instances, n_items: int) -> dict:
    """Every slot a real item, none from the user's own history, no item twice in a list."""
    hist = inst.history.numpy()
    in_hist = (items[:, :, None] == hist[:, None, :]).any(2) & (items >= 0)  # (U, W); padding is -1 in both
    dup = sum(int((row >= 0).sum()) - len(np.unique(row[row >= 0])) for row in items)
    return {"padding_slots": int((items < 0).sum()), "out_of_range": int((items >= n_items).sum()),
            "history_items_returned": int(in_hist.sum()), "duplicate_items": int(dup)}


def bench_decode(model: Seq2Seq, seqs: Sequences, table: ItemTable, trie: PrefixTrie, threads: int, beam: int,
                 n_users: int, batch: int, exclude: bool, seed: int) -> dict:
    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed + 3)
    users = np.sort(rng.choice(len(seqs.offsets) - 1, n_users + batch, replace=False))
    warm, inst = users[:batch], users[batch:]
    rank_with_backbone(model, last_item_instances(seqs, warm, model.cfg.max_history), table, trie, beam,
                       batch, exclude_history=exclude)
    inst = last_item_instances(seqs, inst, model.cfg.max_history)
    rec: dict = {"threads": threads, "beam": beam, "users": n_users, "batch": batch, "exclude_history": exclude}
    with part(rec):
        items, _ = rank_with_backbone(model, inst, table, trie, beam, batch, exclude_history=exclude)
    rec.update(users_per_s=round(n_users / rec["wall_s"], 1), users_per_cpu_s=round(n_users / rec["cpu_s"], 1),
               **check_candidates(items, inst, table.codes.shape[0]))
    return rec


# ---- 4. training ------------------------------------------------------------------------------

def bench_train(params: Params, sizes: list[int], seqs: Sequences, table: ItemTable, threads: int, steps: int,
                seed: int) -> dict:
    torch.set_num_threads(threads)
    cfg, tcfg = params.backbone.model, params.backbone.train
    torch.manual_seed(seed)
    model = Seq2Seq(cfg, sizes, attr_sizes=[]).train()
    opt = make_optimizer(model, tcfg)
    warm = 3
    inst = prefix_instances(seqs, (steps + warm) * tcfg.batch_size, cfg.max_history, seed)
    batches = [torch.arange(i * tcfg.batch_size, (i + 1) * tcfg.batch_size) for i in range(steps + warm)]

    def step(idx: torch.Tensor) -> float:
        b = to_batch(inst.select(idx), table)
        loss = sequence_loss(model(b), b.target_codes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        opt.step()
        return loss.item()

    first_loss = step(batches[0])  # before any update: about sum_l log V_l
    for idx in batches[1:warm]:
        step(idx)
    rec: dict = {"threads": threads, "steps": steps, "batch": tcfg.batch_size,
                 "parameters": sum(p.numel() for p in model.parameters())}
    with part(rec):
        losses = [step(idx) for idx in batches[warm:]]
    sps = steps * tcfg.batch_size / rec["wall_s"]
    flops = 3 * count_flops_per_sample(cfg, sizes, cfg.max_history)
    rec.update(samples_per_s=round(sps, 1), samples_per_cpu_s=round(steps * tcfg.batch_size / rec["cpu_s"], 1),
               flops_per_sample=flops, gflops_per_s=round(sps * flops / 1e9, 1), first_loss=round(first_loss, 4),
               last_loss=round(losses[-1], 4))
    return rec


# ---- driver -----------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--top-clusters", type=int, default=256)
    ap.add_argument("--mean-len", type=int, default=20, help="mean interactions per user (>= 4)")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--rqvae-epochs", type=int, default=1, help="RQ-VAE epochs actually run (the rest extrapolated)")
    ap.add_argument("--skip-rkmeans", action="store_true")
    ap.add_argument("--ids", choices=("rqvae", "rkmeans"), default="rqvae", help="whose IDs the trie and decoding use")
    ap.add_argument("--tokenizer-threads", type=int, default=1,
                    help="torch threads of the tokenizer part (1: CPU seconds stay meaningful on a shared machine)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads of decoding and training")
    ap.add_argument("--beams", type=int, nargs="+", default=[20, 100, 200])
    ap.add_argument("--decode-users", type=int, nargs="+", default=[2048, 1024, 512], help="users per beam, in order")
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--out", type=Path, default=RESULTS / "scale_synthetic.json")
    ap.add_argument("-S", "--set", action="append", default=[],
                    help="params.yaml override, e.g. tokenize.rqvae.kmeans_iters=10")
    args = ap.parse_args(argv)
    if len(args.decode_users) != len(args.beams):
        ap.error("--decode-users needs one count per beam")
    if args.mean_len < 4 or args.items < 2 or args.users < 1:
        ap.error("need --mean-len >= 4, --items >= 2, --users >= 1")
    return args


def checkpoint(path: Path, out: dict) -> None:
    """Write the parts finished so far (marked partial), so a long run that dies keeps them."""
    write_json(path, {**out, "partial": True})


def run(args: argparse.Namespace) -> dict:
    params = load_params(overrides=args.set)
    rq = params.tokenize.rqvae
    out: dict = {**stamp({**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                          "params_hash": params.section_hash("tokenize", "backbone", "candidates"),
                          "rqvae": {k: getattr(rq, k) for k in ("num_levels", "codebook_size", "latent_dim",
                                                                "hidden_dims", "epochs", "batch_size", "kmeans_iters")},
                          "model": vars(params.backbone.model), "candidates_batch_size": params.candidates.batch_size,
                          "embedding_dim": DIM, "sub_clusters_per_top": SUB_PER_TOP, "home_p": HOME_P})}
    gen: dict = {}
    with part(gen):
        cat, gen["items_s"] = timed(make_catalog, args.items, args.top_clusters, args.seed)
        seqs, gen["users_s"] = timed(make_sequences, cat, args.users, args.mean_len, args.seed)
    gen.update(interactions=int(len(seqs.items)), mean_len=round(len(seqs.items) / args.users, 2),
               home_share=round(seqs.home_share, 4), embeddings_mib=round(cat.embeddings.nbytes / 2**20, 1),
               sequences_mib=round((seqs.items.nbytes + seqs.offsets.nbytes) / 2**20, 1))
    out["generate"] = gen
    checkpoint(args.out, out)
    torch.set_num_threads(args.tokenizer_threads)
    x = torch.from_numpy(cat.embeddings)
    tok: dict = {"threads": args.tokenizer_threads}
    tok["rqvae"], ids, sizes = bench_rqvae(x, rq, args.rqvae_epochs, params.tokenize.dedup_last_level)
    if not args.skip_rkmeans:
        tok["rkmeans"], km_ids, km_sizes = bench_rkmeans(x, rq, params.tokenize.dedup_last_level)
        if args.ids == "rkmeans":
            ids, sizes = km_ids, km_sizes
        del km_ids
    out["tokenizer"] = tok
    checkpoint(args.out, out)
    del x, cat
    gc.collect()
    out["trie"], trie = bench_trie(ids, sizes)
    checkpoint(args.out, out)
    table = ItemTable(torch.from_numpy(ids), torch.zeros(len(ids), 0, dtype=torch.long))
    torch.manual_seed(args.seed)
    model = Seq2Seq(params.backbone.model, sizes, attr_sizes=[]).eval()
    bs = params.candidates.batch_size
    runs = [bench_decode(model, seqs, table, trie, t, b, n, bs, True, args.seed)
            for t in args.threads for b, n in zip(args.beams, args.decode_users)]
    runs.append(bench_decode(model, seqs, table, trie, min(args.threads), args.beams[0], args.decode_users[0], bs,
                             False, args.seed))
    out["candidates"] = {"weights": "random init (throughput only)", "runs": runs}
    checkpoint(args.out, out)
    out["train"] = [bench_train(params, sizes, seqs, table, t, args.train_steps, args.seed) for t in args.threads]
    out["peak_rss_mib_process"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["load_avg_end"] = round(os.getloadavg()[0], 2)
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    payload = run(args)
    write_json(args.out, payload)
    print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
