"""The pipeline's artifacts: where each lives under `data/<dataset>/`, how to load it, and how a
trained model is published. Stage modules share these instead of importing each other.

- splits and items: `load_split`, `load_rows` (SASRec's view), `load_item_table`, `load_semantic_ids`
- models: `load_backbone`, `load_grc`, `load_baseline`, `load_ensemble` (the SASRec ensemble) and
  `cf_log_probs` (the collaborative distribution tiger_cf is steered by), and `load_ranker(method)`,
  the one place that turns a method name into a ranking over test users (evaluate and candidates both use it)
- training outputs (checkpoints are tasks/checkpoints.py's): `promote_best` (the best checkpoint becomes `model.safetensors` beside its `config.json`),
  `write_log` (the per-epoch CSV that `dvc plots` draws)
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from safetensors.torch import load_file

from grc_core.cf_value import item_prefix_nodes, prefix_values
from grc_core.config import ValueConfig, VEDConfig
from grc_core.data import Instances, ItemTable, history_mask, make_instances
from grc_core.evaluation import ReflectionStats, rank_with_backbone, rank_with_grc, ranking_metrics
from grc_core.grc import DecodeConfig, GRCModel, grc_from_config
from grc_core.model import Seq2Seq
from grc_core.sasrec import SASRec, SeqRows, fuse_log_probs, score_all, top_by_log_probs
from grc_core.trie import PrefixTrie
from grc_core.value import ValueHead
from grc_core.ved import CFValue, LearnedValue, WeightedValue, rank_with_ved
from tasks import io
from tasks.stages import METHOD_MODELS
from tasks.store import published_paths  # the files of the version the store names

METHODS = tuple(METHOD_MODELS)
GRC_METHODS = ("gc_sft", "grc_sft", "grc_rl")
POLICY_METHODS = ("tiger_rl", "vstar")  # RL-tuned backbones, decoded by TIGER's plain beam
# The methods `load_ranker` decodes alike, so that the same weights give the same ranks: the plain
# beam (the backbone's config with a policy's weights) and two-pass GRC (a template model).
DECODINGS = {"tiger": "beam", **{m: "beam" for m in POLICY_METHODS}, **{m: "grc" for m in GRC_METHODS}}


# --- splits and items --------------------------------------------------------------------------


def load_split(out_dir: Path, name: str, max_len: int) -> Instances:
    frame = io.read_parquet(published_paths(out_dir)[f"splits/{name}.parquet"])
    return make_instances(frame["user_id"].to_list(), frame["history"].to_list(), frame["target"].to_list(), max_len)


def load_rows(out_dir: Path, name: str) -> SeqRows:
    f = io.read_parquet(published_paths(out_dir)[f"splits/{name}.parquet"])
    return SeqRows(f["history"].to_list(), f["target"].to_numpy().astype(np.int64),
                   f["user_id"].to_numpy(), f["target_pos"].to_numpy())


def subset(inst: Instances, n: int, seed: int) -> Instances:
    """A fixed random subset of n instances in their original order (n <= 0: all)."""
    if n <= 0 or n >= len(inst):
        return inst
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(inst), generator=gen)[:n].sort().values
    return inst.select(idx)


def load_semantic_ids(tokenizer_dir: Path) -> tuple[np.ndarray, list[int]]:
    """(N, L') IDs in item_id order and the vocabulary size of each level."""
    frame = io.read_parquet(tokenizer_dir / "semantic_ids.parquet").sort("item_id")
    meta = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    return np.asarray(frame["codes"].to_list(), dtype=np.int64), list(meta["level_sizes"])


def load_item_table(out_dir: Path, attributes: tuple[str, ...]) -> tuple[ItemTable, list[int], list[int]]:
    ids, level_sizes = load_semantic_ids(out_dir / "tokenizer")
    items = io.read_parquet(published_paths(out_dir)["items.parquet"]).sort("item_id")
    cols = [items[f"{a}_bucket"].to_numpy().astype(np.int64) for a in attributes]
    attrs = np.stack(cols, 1) if cols else np.zeros((items.height, 0), np.int64)  # (N, A)
    attr_sizes = [int(c.max()) + 1 for c in cols]
    return ItemTable(torch.from_numpy(ids), torch.from_numpy(attrs)), level_sizes, attr_sizes


def item_index(out_dir: Path, attributes: tuple[str, ...], device: torch.device | str
               ) -> tuple[ItemTable, PrefixTrie, list[int], list[int]]:
    """The item table on `device` and the prefix trie of its semantic IDs."""
    table, level_sizes, attr_sizes = load_item_table(out_dir, attributes)
    table = table.to(device)
    trie = PrefixTrie.from_ids(table.codes.cpu().numpy(), level_sizes).to(device)
    return table, trie, level_sizes, attr_sizes


# --- models ------------------------------------------------------------------------------------


def model_dir(out_dir: Path, method: str) -> Path:
    """The folder of a method's (first) model."""
    if method not in METHOD_MODELS:
        raise ValueError(f"unknown method {method!r} (known: {list(METHOD_MODELS)})")
    return out_dir / METHOD_MODELS[method][0]


def model_files(method: str) -> tuple[str, ...]:
    """The weights and config of each model a method decodes with, relative to data/<dataset>/."""
    return tuple(f"{d}/{f}" for d in METHOD_MODELS[method] for f in ("model.safetensors", "config.json"))


def load_backbone(out_dir: Path, device: torch.device | str = "cpu", weights: Path | None = None) -> Seq2Seq:
    """The stage backbone, or the same architecture with other `weights` (e.g. a cross-fitted fold's)."""
    cfg = json.loads((out_dir / "backbone" / "config.json").read_text())
    model = Seq2Seq.from_architecture(cfg)
    model.load_state_dict(load_file(str(weights or out_dir / "backbone" / "model.safetensors")))
    return model.to(device).eval()


def backbone_prior(out_dir: Path) -> float:
    """The weight of SASRec's prior the backbone was trained under (`backbone.cf_prior`, recorded in
    its config.json; 0 for a plain backbone)."""
    return float(json.loads((out_dir / "backbone" / "config.json").read_text()).get("cf_prior", 0.0))


def backbone_cf_mode(out_dir: Path) -> str:
    """How `tiger_cf` fuses SASRec's value with this backbone: "levelwise" where it was trained with
    SASRec's prior in its logits (`backbone_prior` > 0), so that its own distribution is the
    residual of that product; otherwise "shallow" (grc_core/beam_search.py)."""
    return "levelwise" if backbone_prior(out_dir) > 0 else "shallow"


def require_plain_backbone(out_dir: Path, reader: str) -> None:
    """Refuse to let `reader` (a stage or a method that reads the backbone's distribution alone) use
    a backbone trained as the residual of SASRec's prior: only `tiger_cf` decodes that product."""
    prior = backbone_prior(out_dir)
    if prior > 0:
        raise ValueError(
            f"{out_dir / 'backbone' / 'config.json'}: field cf_prior is {prior:g}: this backbone was trained as the "
            f"residual of SASRec's prior and only tiger_cf decodes it; {reader} reads its distribution alone. "
            "Train the backbone with backbone.cf_prior: 0, or rank only sasrec and tiger_cf "
            "(evaluate.methods; docs/DESIGN.md, 'SASRec as a prior in training').")


def load_grc(out_dir: Path, method: str, device: torch.device | str = "cpu") -> GRCModel:
    """A trained template model: gc_sft, grc_sft (data/<ds>/sft/<variant>/) or grc_rl (data/<ds>/grpo/)."""
    if method not in GRC_METHODS:
        raise ValueError(f"load_grc: {method!r} is not one of {GRC_METHODS}")
    where = model_dir(out_dir, method)
    model = grc_from_config(json.loads((where / "config.json").read_text()))
    model.load_state_dict(load_file(str(where / "model.safetensors")))
    return model.to(device).eval()


def load_baseline(out_dir: Path, device: torch.device | str = "cpu") -> SASRec:
    model = SASRec.from_architecture(json.loads((out_dir / "sasrec" / "config.json").read_text()))
    model.load_state_dict(load_file(str(out_dir / "sasrec" / "model.safetensors")))
    return model.to(device).eval()


ENSEMBLE = "sasrec_ensemble"  # the sasrec stage's further SASRecs and their chosen weight (tasks/sasrec.py)


def load_ensemble(out_dir: Path, device: torch.device | str = "cpu") -> tuple[list[SASRec], float]:
    """The sasrec stage's further SASRecs (`sasrec_ensemble.seeds`, in that order) and the weight w
    of their mean log-probability it chose on validation. No members (and w 0) where the stage
    trained none, or where the folder is absent: a run or a published bundle made before it."""
    where = out_dir / ENSEMBLE
    if not (where / "config.json").is_file():
        return [], 0.0
    config = json.loads((where / "config.json").read_text())
    state = load_file(str(where / "model.safetensors")) if config["seeds"] else {}
    members = []
    for seed in config["seeds"]:
        model = SASRec.from_architecture(config["architecture"])
        prefix = f"{seed}."
        model.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        members.append(model.to(device).eval())
    return members, float(config["weight"]) if members else 0.0


def check_ensemble(out_dir: Path, seeds: tuple[int, ...], method: str) -> None:
    """Refuse to rank `method` (tiger_cf, sasrec_ens) with an ensemble other than the params' own:
    `sasrec_ensemble/config.json` must hold `seeds` (no folder counts as none)."""
    if method not in ("tiger_cf", "sasrec_ens"):
        return
    path = out_dir / ENSEMBLE / "config.json"
    have = json.loads(path.read_text())["seeds"] if path.is_file() else []
    if list(have) != list(seeds):
        raise ValueError(f"{path}: field seeds is {list(have)}, but sasrec_ensemble.seeds is {list(seeds)}; "
                         f"run the sasrec stage again before ranking {method}")


def cf_log_probs(out_dir: Path, device: torch.device | str = "cpu",
                 reader: str = "") -> Callable[[Instances], torch.Tensor]:
    """Instances (B,) -> the collaborative item log-distribution (B, N) that steers tiger_cf and ranks
    sasrec_ens: SASRec's, fused with the sasrec stage's ensemble where it has members
    (`fuse_log_probs` at the chosen w). `reader`: a method that needs the ensemble (refused without)."""
    first = sasrec_log_probs(load_baseline(out_dir, device))
    members, weight = load_ensemble(out_dir, device)
    if reader and not members:
        raise FileNotFoundError(f"method {reader}: {out_dir / ENSEMBLE} holds no SASRec ensemble; train one with "
                                "sasrec_ensemble.seeds (the sasrec stage)")
    if not members or weight == 0:
        return first
    others = [sasrec_log_probs(m) for m in members]
    return lambda inst: fuse_log_probs(first(inst), [o(inst) for o in others], weight)


def histories_of(inst: Instances) -> list[list[int]]:
    """Each instance's history items, oldest first, without the padding: what SASRec reads."""
    return [h[h >= 0].tolist() for h in inst.history.numpy()]


def top_items(scores_of: Callable[[Instances], torch.Tensor], inst: Instances, k: int, batch_size: int,
              exclude_history: bool, progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k best items (B, k) of each instance by `scores_of(batch)` (B, N), and their scores, best
    first; ties go to the smaller item id. Excluded history items come back as padding (-1, -inf),
    like the beam's."""
    items, scores = [], []
    for start in range(0, len(inst), batch_size):
        part = inst.select(torch.arange(start, min(start + batch_size, len(inst))))
        score = scores_of(part)
        if exclude_history:
            score = score.masked_fill(history_mask(part.history.to(score.device), score.shape[1]), float("-inf"))
        top, best = top_by_log_probs(score, k)
        items.append(top)
        scores.append(best)
        if progress is not None:
            progress(len(part))
    if not items:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    return np.concatenate(items), np.concatenate(scores)  # (B, k), (B, k)


def sasrec_top(model: SASRec, inst: Instances, k: int, batch_size: int, exclude_history: bool,
               progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """SASRec's k best items (B, k) and their logits (`top_items`)."""
    return top_items(lambda part: torch.as_tensor(score_all(model, histories_of(part))), inst, k, batch_size,
                     exclude_history, progress)


def decode_config(ev, width: int, ved_test: VEDConfig) -> DecodeConfig:
    """Two-pass GRC decoding under the `evaluate` section's rules at beam `width` (test ranking, dumps);
    with `evaluate.grc_drafts: ved`, the drafts come from VED under `ved_test` (`vstar.ved_test`)."""
    return DecodeConfig(width=width, correct_width=ev.correct_width, alpha_e=ev.alpha_e, rank_rule=ev.rank_rule,
                        reflect_width=ev.reflect_width, verify_gamma=ev.verify_gamma, cf_weight=ev.grc_cf_weight,
                        draft_ved=ved_test if ev.grc_drafts == "ved" else None)


def selection_decode(width: int, rank_rule: str, verify_gamma: float) -> DecodeConfig:
    """Model selection (sft, grpo) decodes plainly: every draft reflected on, a full-width
    correction, no EGRS, no collaborative value; the merge rule is the test's (`evaluate.rank_rule`,
    and `evaluate.verify_gamma` under `verify`)."""
    return DecodeConfig(width=width, correct_width=0, alpha_e=0.0, reflect_width=0, rank_rule=rank_rule,
                        verify_gamma=verify_gamma, cf_weight=0.0)


def grc_selection_metrics(model: GRCModel, valid: Instances, table: ItemTable, trie: PrefixTrie, width: int,
                          rank_rule: str, verify_gamma: float, batch_size: int, exclude_history: bool
                          ) -> dict[str, float]:
    """Validation Recall/NDCG@5/10/20 of a template model under `selection_decode`: what sft and
    grpo select their checkpoints on."""
    ranked, _ = rank_with_grc(model, valid, table, trie, selection_decode(width, rank_rule, verify_gamma), batch_size,
                              exclude_history=exclude_history)
    return ranking_metrics(ranked, valid.target.numpy(), ks=(5, 10, 20))[0]


class Ranker(Protocol):
    def __call__(self, inst: Instances, progress: Callable[[int], None] | None = None,
                 stats: ReflectionStats | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Instances (U,) -> items and scores (U, W), best first; padding is item -1."""


def sasrec_log_probs(model: SASRec) -> Callable[[Instances], torch.Tensor]:
    """Instances (B,) -> SASRec's log-softmax over the catalog after each history, (B, N)."""
    def item_logp(inst: Instances) -> torch.Tensor:
        return torch.log_softmax(torch.as_tensor(score_all(model, histories_of(inst))), -1)  # (B, N)
    return item_logp


def tiger_cf_weight(out_dir: Path, weights: tuple[float, ...]) -> float:
    """`tiger_cf`'s weight w of SASRec's prefix value: the one value of `evaluate.cf_weights`, or
    the one evaluate chose among several on the validation split (`eval/leaderboard.json`,
    field `tiger_cf_weight`). A choice made over another list of weights is refused as stale."""
    if len(weights) == 1:
        return float(weights[0])
    path = out_dir / "eval" / "leaderboard.json"
    if not path.is_file():
        raise FileNotFoundError(f"tiger_cf: evaluate.cf_weights has {len(weights)} values and {path} does not "
                                "exist; run the evaluate stage first (it chooses the weight on the validation "
                                "split), or give evaluate.cf_weights one value")
    chosen = io.read_json(path).get("tiger_cf_weight")
    if chosen is None:
        raise ValueError(f"{path}: no field tiger_cf_weight (tiger_cf was not ranked on the validation split); "
                         "run the evaluate stage with tiger_cf among evaluate.methods, or give evaluate.cf_weights "
                         "one value")
    tried = [float(w) for w in chosen["weights"]]
    if tried != [float(w) for w in weights]:
        raise ValueError(f"{path}: field tiger_cf_weight was chosen among {tried}, not among this run's "
                         f"evaluate.cf_weights {list(weights)}; run the evaluate stage again")
    return float(chosen["chosen"])


def decode_identity(out_dir: Path, method: str) -> tuple[str, str, str] | None:
    """What fixes `method`'s ranking of a split, besides the stage's decode settings, where another
    method can share it: (its decoding, the sha256 of the weights it decodes, of their config).
    An RL stage that keeps its iteration 0 publishes its start weights unchanged (`tiger_rl` and
    `vstar` the backbone's, `grc_rl` `grc_sft`'s), and then ranks exactly as that method. None
    where no other method decodes alike, or the weights are missing (ranking then says why)."""
    decoding = DECODINGS.get(method)
    weights = model_dir(out_dir, method) / "model.safetensors"
    if decoding is None or not weights.exists():
        return None
    config = out_dir / "backbone" / "config.json" if decoding == "beam" else weights.with_name("config.json")
    return decoding, io.sha256_file(weights), io.sha256_file(config)


def load_ranker(method: str, out_dir: Path, attributes: tuple[str, ...], device: torch.device | str,
                decode: DecodeConfig, batch_size: int, exclude_history: bool, cf_weight: float) -> Ranker:
    """One method's ranking of the catalog for any instances: the beam of `decode.width` (tiger;
    tiger_cf with the prefix value of `cf_log_probs` at `cf_weight`, grc_core/cf_value.py, fused as
    `backbone_cf_mode` says; SASRec's alone for a backbone trained on SASRec's prior), two-pass GRC
    decoding under `decode` (gc_sft, grc_sft, grc_rl; with SASRec's prefix value in both passes
    where `decode.cf_weight` > 0), SASRec's top `decode.width` logits (sasrec), the SASRec
    ensemble's top `decode.width` (sasrec_ens). `stats` collects GRC's reflection statistics where given."""
    model_dir(out_dir, method)  # unknown method: a clear error before anything loads
    if method == "sasrec":
        model = load_baseline(out_dir, device)
        return lambda inst, progress=None, stats=None: sasrec_top(model, inst, decode.width, batch_size,
                                                                  exclude_history, progress)
    if method == "sasrec_ens":
        fused = cf_log_probs(out_dir, device, reader=method)
        return lambda inst, progress=None, stats=None: top_items(fused, inst, decode.width, batch_size,
                                                                 exclude_history, progress)
    if method != "tiger_cf" and "backbone" in METHOD_MODELS[method]:  # GRC's bundles hold no backbone: sft refused it
        require_plain_backbone(out_dir, f"method {method}")
    table, trie, _, _ = item_index(out_dir, attributes, device)
    if method in POLICY_METHODS:
        policy = load_backbone(out_dir, device, model_dir(out_dir, method) / "model.safetensors")
        return lambda inst, progress=None, stats=None: rank_with_backbone(
            policy, inst, table, trie, decode.width, batch_size, progress, exclude_history)
    if method == "vstar_ved":
        return vstar_ved_ranker(out_dir, table, trie, device, batch_size, exclude_history)
    if method in ("tiger", "tiger_cf"):
        backbone = load_backbone(out_dir, device)
        mode = backbone_cf_mode(out_dir)
        item_logp = None
        if method == "tiger_cf":  # a backbone trained as the residual of SASRec's prior decodes with that SASRec
            item_logp = (cf_log_probs(out_dir, device) if mode == "shallow"
                         else sasrec_log_probs(load_baseline(out_dir, device)))
        return lambda inst, progress=None, stats=None: rank_with_backbone(
            backbone, inst, table, trie, decode.width, batch_size, progress, exclude_history, item_logp, cf_weight,
            mode)
    grc = load_grc(out_dir, method, device)
    use_cf = decode.cf_weight > 0 or decode.draft_ved is not None
    grc_logp = sasrec_log_probs(load_baseline(out_dir, device)) if use_cf else None
    return lambda inst, progress=None, stats=None: rank_with_grc(
        grc, inst, table, trie, decode, batch_size, progress, stats, exclude_history, grc_logp)


def load_value_head(out_dir: Path, device: torch.device | str = "cpu") -> tuple[ValueHead, dict]:
    """The vstar stage's value head V_phi and its vstar/value/config.json (value settings, `ved_test`,
    `ved_value`, `ved_cf_weight`)."""
    meta = json.loads((out_dir / "vstar" / "value" / "config.json").read_text())
    vcfg = meta["value"]
    head = ValueHead(meta["d_model"], ValueConfig(**{**vcfg, "level_weights": tuple(vcfg["level_weights"])}))
    head.load_state_dict(load_file(str(out_dir / "vstar" / "value" / "model.safetensors")))
    return head.to(device).eval(), meta


def ved_value(head: ValueHead, out_dir: Path, trie: PrefixTrie, source: str, cf_weight: float,
              device: torch.device | str = "cpu"):
    """VED's value for a batch of users, `(part, exclude) -> PrefixValue`: `learned` (V_phi), `cf`
    (SASRec's V_cf, grc_core/cf_value.py) or `sum` (V_phi + cf_weight V_cf)."""
    if source == "learned":
        return lambda part, exclude: LearnedValue(head)
    item_logp = sasrec_log_probs(load_baseline(out_dir, device))
    nodes = item_prefix_nodes(trie)

    def value_for(part: Instances, exclude):
        cf = CFValue(prefix_values(item_logp(part).to(trie.ids.device), nodes, trie, exclude))
        return cf if source == "cf" else WeightedValue([(LearnedValue(head), 1.0), (cf, cf_weight)])

    return value_for


def vstar_ved_ranker(out_dir: Path, table: ItemTable, trie: PrefixTrie, device: torch.device | str, batch_size: int,
                     exclude_history: bool) -> Ranker:
    """The V-STAR policy decoded by VED (grc_core/ved.py) under the `vstar.ved_test` config and value
    source that the vstar stage wrote into vstar/value/config.json."""
    policy = load_backbone(out_dir, device, model_dir(out_dir, "vstar") / "model.safetensors")
    head, meta = load_value_head(out_dir, device)
    value_for = ved_value(head, out_dir, trie, meta["ved_value"], float(meta["ved_cf_weight"]), device)
    cfg = VEDConfig(**meta["ved_test"])
    return lambda inst, progress=None, stats=None: rank_with_ved(
        policy, inst, table, trie, cfg, value_for, batch_size, progress, exclude_history)


# --- training outputs --------------------------------------------------------------------------


def promote_best(work: Path, config: dict) -> None:
    """Publish the best checkpoint: `work/model.safetensors` (atomically) and `work/config.json`."""
    with io.atomic_path(work / "model.safetensors") as tmp:
        shutil.copyfile(work / "ckpt" / "best" / "model.safetensors", tmp)
    io.write_json(work / "config.json", config)


def write_log(path: Path, history: list[dict]) -> None:
    """A training log as CSV (one row per epoch or iteration), for `dvc plots`."""
    if not history:
        return
    keys = sorted({k for r in history for k in r})
    with io.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
