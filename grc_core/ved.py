"""Value-guided efficient decoding, VED (V-STAR paper, Sec. 4.2, Eqs. 8-14), batched over users.

A search tree over semantic-ID prefixes per user, grown under a budget of backbone forward
tokens (one token per tree node: the decoder reads the node's code on top of its ancestors' KV
cache and yields its hidden state, the policy's next-level distribution and its value):

  1. Initialisation (`_init_tree`): a trie-constrained beam of width `init_beam` under pi; every
     prefix the beam keeps, at every level, is a node, the last level's included (their values
     need their own forward token). Cost 1 + sum_l min(init_beam, prefixes at level l).
  2. Selection (Eq. 13): from the root, the child with the largest
     U = G + beta sqrt(ln(N_root + 1) / (N + 1)) until a node without children.
  3. Gated expansion (Eq. 14): the deepest node on that path that is not terminal, not fully
     expanded and has G >= mean G of the tree's nodes at its depth gets one new child, drawn
     from its unexpanded valid children by the policy renormalised over them ("sample") or
     their argmax ("greedy").
  4. Backpropagation: every node on the selected path gets one more visit; a new node starts
     at N = 1.
  Rounds 2-4 repeat while the next node fits the budget (cost <= budget), at most `max_iters`.
  G = V + lambda H for l < L (Eq. 11), G = V at l = L; H is the entropy of pi over the valid
  children. Candidates: the depth-L leaves by V, then, if short, the unexpanded valid children
  of depth-(L-1) nodes from their cached policy rows (no forward token), by the parent's V,
  then pi.

The value comes through one interface, `PrefixValue` (the learned V_phi of grc_core/value.py,
SASRec's V_cf of grc_core/cf_value.py, or a weighted sum). Valid IDs only (the trie) and,
with `exclude`, never an excluded item (masked like an invalid code at the last level).

Python loops run over levels and selection rounds, never over users: every user's tree lives
in (B, M) tensors (M = node capacity) and one round is one batched decoder step of one token.
`reference_ved` is the same algorithm per user and per node, each node's hidden state from a
full teacher-forced `Seq2Seq.decode` of its prefix: slow and obvious, for the parity test.

Departures from the paper's public code (docs/DESIGN.md, "V-STAR"): their initial tree takes the
top `init_beam` children of every frontier node (init_beam^l nodes at depth l, not a beam), their
default budget 1 + (L-1) init_beam is below that tree's cost so the UCB rounds never run, a node's
value there is its parent's state's value, and leaves are not forwarded. Here the tree is a beam,
the budget counts every node (leaves included) and the rounds run whenever the budget exceeds the
beam's cost.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from grc_core.config import VEDConfig
from grc_core.data import history_mask, to_batch
from grc_core.model import Batch, Seq2Seq, decoder_step
from grc_core.trie import PrefixTrie

if TYPE_CHECKING:  # an annotation only: importing grc_core.value here would close an import cycle
    from grc_core.value import ValueHead  # (value -> grpo -> train -> evaluation -> ved)

NEG_INF = float("-inf")


class ValueQuery(NamedTuple):
    """What a prefix value may read of K nodes per user."""

    hidden: torch.Tensor  # (B, K, L+1, D) decoder states along each node's path, positions past its depth unused
    depth: torch.Tensor  # (B, K) prefix length l (0 = root)
    node: torch.Tensor  # (B, K) trie node at that depth (the item index at depth L)


class PrefixValue(Protocol):
    def __call__(self, q: ValueQuery) -> torch.Tensor:
        """V(s) of each queried node, (B, K)."""
        ...


class LearnedValue:
    """V_phi (grc_core/value.py): the head over the path's states, read at the node's depth."""

    def __init__(self, head: ValueHead):
        self.head = head

    def __call__(self, q: ValueQuery) -> torch.Tensor:
        b, k, s, d = q.hidden.shape
        v = self.head(q.hidden.reshape(b * k, s, d)).view(b, k, s)  # (B, K, L+1)
        return v.gather(2, q.depth.clamp_min(0)[..., None])[..., 0]  # (B, K)


class CFValue:
    """V_cf (grc_core/cf_value.py): log of a collaborative model's mass under the prefix, for one
    batch of users. `levels[l]` (B, nodes at level l+1) as `prefix_values` returns them. A prefix
    with no mass (every item excluded) gets `floor` instead of -inf, so depth means stay finite."""

    def __init__(self, levels: Sequence[torch.Tensor], floor: float = -30.0):
        self.levels, self.floor = list(levels), floor

    def __call__(self, q: ValueQuery) -> torch.Tensor:
        out = torch.zeros(q.depth.shape, dtype=self.levels[0].dtype, device=q.depth.device)  # (B, K) root: log 1
        for level, table in enumerate(self.levels):
            at = q.depth == level + 1
            got = table.gather(1, torch.where(at, q.node, 0).clamp_min(0))  # (B, K)
            out = torch.where(at, got, out)
        return out.clamp_min(self.floor)


class WeightedValue:
    """sum_i w_i V_i: e.g. V_phi + w V_cf."""

    def __init__(self, parts: Sequence[tuple[PrefixValue, float]]):
        self.parts = list(parts)

    def __call__(self, q: ValueQuery) -> torch.Tensor:
        return sum(w * v(q) for v, w in self.parts if w != 0.0)


class VEDResult(NamedTuple):
    items: torch.Tensor  # (B, C) item index, -1 for padding; leaves by value first, then filled ones
    codes: torch.Tensor  # (B, C, L) their IDs, -1 for padding
    scores: torch.Tensor  # (B, C) descending: V for leaves; below every leaf for filled items; -inf for padding
    from_leaf: torch.Tensor  # (B, C) bool, True for a depth-L leaf of the tree
    cost: torch.Tensor  # (B,) backbone forward tokens spent
    leaves: torch.Tensor  # (B,) depth-L leaves in the tree


def forward_tokens_of_beam(trie: PrefixTrie, width: int) -> int:
    """Forward tokens of a beam search of `width` (BOS, then each kept prefix of levels 1..L-1):
    what VED's budget is compared with."""
    total, prev = 1, 1
    for level in range(trie.num_levels - 1):
        prev = min(width, prev * trie.level_sizes[level], trie.num_nodes(level + 1))
        total += prev
    return total


class _Tree:
    """Every user's search tree as (B, M+1) tensors; slot M is a scratch slot that is never alive."""

    def __init__(self, b: int, m: int, n_levels: int, v_max: int, d: int, layers: int, heads: int, dh: int,
                 device: torch.device, dtype: torch.dtype):
        z = lambda *s, dt=torch.long, v=0: torch.full((b, m + 1, *s), v, dtype=dt, device=device)  # noqa: E731
        self.m = m
        self.alive = z(dt=torch.bool, v=False)
        self.depth, self.parent, self.code, self.tnode = z(v=-1), z(v=-1), z(v=-1), z()
        self.anc = z(n_levels + 1, v=-1)  # (B, M+1, L+1) the ancestor at each depth, itself at its own
        self.logp = z(dt=dtype, v=0.0)  # log pi of the path
        self.hidden = z(d, dt=dtype, v=0.0)  # (B, M+1, D)
        self.keys = [z(heads, dh, dt=dtype, v=0.0) for _ in range(layers)]  # per layer (B, M+1, H, dh)
        self.values = [z(heads, dh, dt=dtype, v=0.0) for _ in range(layers)]
        self.next_logp = z(v_max, dt=dtype, v=NEG_INF)  # (B, M+1, V_max) log pi of each valid child code
        self.n_valid, self.n_kids, self.visits = z(), z(), z()
        self.value, self.entropy, self.priority = z(dt=dtype, v=0.0), z(dt=dtype, v=0.0), z(dt=dtype, v=0.0)


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, M+1, ...) at idx (B, K) -> (B, K, ...)."""
    flat = idx.reshape(idx.shape[0], -1)
    out = x.gather(1, flat.view(*flat.shape, *([1] * (x.dim() - 2))).expand(*flat.shape, *x.shape[2:]))
    return out.view(*idx.shape, *x.shape[2:])


def _put(x: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> None:
    """x[b, idx[b, k]] = src[b, k] for idx (B, K) (scratch slot M for nothing to write)."""
    x.scatter_(1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:]), src)


def _child_rows(seq: Seq2Seq, trie: PrefixTrie, hidden: torch.Tensor, depth: torch.Tensor, tnode: torch.Tensor,
                exclude: torch.Tensor | None, v_max: int) -> torch.Tensor:
    """log pi of each valid child code of nodes (B, K) at `depth`, -inf for invalid (and excluded
    items): (B, K, V_max); all -inf at depth L."""
    b, k = depth.shape
    n_levels = trie.num_levels
    out = hidden.new_full((b, k, v_max), NEG_INF)
    for level in range(n_levels):
        at = depth == level  # (B, K)
        if not bool(at.any()):
            continue
        size = trie.level_sizes[level]
        child = trie.children(level, torch.where(at, tnode, 0))  # (B, K, V_l)
        ok = child >= 0
        if exclude is not None and level == n_levels - 1:
            ok &= ~exclude.gather(1, child.clamp_min(0).view(b, -1)).view_as(child)
        lp = F.log_softmax(seq.heads[level](hidden), dim=-1).masked_fill(~ok, NEG_INF)  # (B, K, V_l)
        row = F.pad(lp, (0, v_max - size), value=NEG_INF)  # (B, K, V_max)
        out = torch.where(at[..., None], row, out)
    return out


def _entropy(rows: torch.Tensor) -> torch.Tensor:
    """Entropy of pi renormalised over the valid children (finite entries): (B, K, V) -> (B, K); 0 without any."""
    has = torch.isfinite(rows).any(-1, keepdim=True)
    lp = F.log_softmax(torch.where(has, rows, torch.zeros_like(rows)), dim=-1)  # (B, K, V)
    h = -(lp.exp() * lp.masked_fill(~torch.isfinite(rows), 0.0)).sum(-1)
    return h * has[..., 0]


def _add_nodes(tree: _Tree, seq: Seq2Seq, memory, trie: PrefixTrie, value: PrefixValue, cfg: VEDConfig,
               slot: torch.Tensor, parent: torch.Tensor, code: torch.Tensor, live: torch.Tensor,
               exclude: torch.Tensor | None, v_max: int) -> None:
    """Create K nodes per user (B, K) at `slot`, children of `parent` by `code`, where `live`: one
    batched decoder step on the parents' cached paths. Dead entries write to the scratch slot."""
    n_levels = trie.num_levels
    slot = torch.where(live, slot, tree.m)  # (B, K)
    parent = parent.clamp_min(0)
    depth = _take(tree.depth, parent) + 1  # (B, K)
    code = code.clamp_min(0)
    tnode = torch.zeros_like(code)
    x = torch.zeros(*code.shape, seq.cfg.d_model, dtype=tree.hidden.dtype, device=code.device)  # (B, K, D)
    for level in range(n_levels):
        at = depth == level + 1
        if not bool(at.any()):
            continue
        tn = trie.next_nodes(level, torch.where(at, _take(tree.tnode, parent), 0),
                             torch.where(at, code, 0).clamp_max(trie.level_sizes[level] - 1))
        tnode = torch.where(at, tn.clamp_min(0), tnode)
        # Positions differ per node: decoder_step adds dec_pos[0]; the difference to dec_pos[depth] goes in here.
        e = seq.dec_codes[level](torch.where(at, code, 0).clamp_max(trie.level_sizes[level] - 1))  # (B, K, D)
        x = torch.where(at[..., None], e, x)
    x = x + seq.dec_pos.weight[depth] - seq.dec_pos.weight[0]  # (B, K, D)
    anc = _take(tree.anc, parent)  # (B, K, L+1) the parent's path
    cache = anc[..., :n_levels]  # (B, K, L) positions 0..L-1
    keys = [_take(kk, cache.clamp_min(0)).transpose(2, 3) for kk in tree.keys]  # (B, K, H, L, dh)
    values = [_take(vv, cache.clamp_min(0)).transpose(2, 3) for vv in tree.values]
    pos = torch.arange(n_levels + 1, device=depth.device)
    mask = torch.zeros(*depth.shape, 1, 1, n_levels + 1, dtype=x.dtype, device=x.device)  # (B, K, 1, 1, L+1)
    mask = mask.masked_fill(((pos < n_levels) & (pos >= depth[..., None]))[:, :, None, None, :], NEG_INF)
    hidden, new_k, new_v = decoder_step(seq, memory, keys, values, x[:, :, None], 0, mask)  # (B, K, 1, D)
    hidden = hidden[:, :, 0]  # (B, K, D)
    anc = anc.scatter(2, depth[..., None], slot[..., None])  # (B, K, L+1) with itself at its depth
    path_hidden = _take(tree.hidden, anc.clamp_min(0))  # (B, K, L+1, D)
    path_hidden = path_hidden.scatter(2, depth[..., None, None].expand(-1, -1, 1, hidden.shape[-1]), hidden[:, :, None])
    v = value(ValueQuery(path_hidden, depth, tnode))  # (B, K)
    rows = _child_rows(seq, trie, hidden, depth, tnode, exclude, v_max)  # (B, K, V_max)
    h = _entropy(rows)
    g = cfg.value_weight * v + torch.where(depth < n_levels, cfg.entropy_weight * h, 0.0)
    lp = _take(tree.logp, parent) + _take(tree.next_logp, parent).gather(2, code.clamp_max(v_max - 1)[..., None])[..., 0]
    for store, src in ((tree.alive, live), (tree.depth, depth), (tree.parent, parent), (tree.code, code),
                       (tree.tnode, tnode), (tree.anc, anc), (tree.logp, lp), (tree.hidden, hidden),
                       (tree.next_logp, rows), (tree.n_valid, torch.isfinite(rows).sum(-1)),
                       (tree.n_kids, torch.zeros_like(depth)), (tree.visits, torch.ones_like(depth)),
                       (tree.value, v), (tree.entropy, h), (tree.priority, g)):
        _put(store, slot, src)
    for kk, nk in zip(tree.keys, new_k):
        _put(kk, slot, nk[:, :, :, -1])  # (B, K, H, dh) the new position's key
    for vv, nv in zip(tree.values, new_v):
        _put(vv, slot, nv[:, :, :, -1])
    kids = torch.zeros_like(tree.n_kids).scatter_add_(1, torch.where(live, parent, tree.m), live.long())
    tree.n_kids += kids
    tree.alive[:, tree.m] = False


def _init_tree(tree: _Tree, seq: Seq2Seq, memory, trie: PrefixTrie, value: PrefixValue, cfg: VEDConfig,
               exclude: torch.Tensor | None, v_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1: the root (BOS) and the beam's prefixes; returns (cost (B,), next free slot (B,))."""
    b = tree.alive.shape[0]
    dev = tree.alive.device
    x = seq.bos.expand(b, 1, 1, -1)  # (B, 1, 1, D)
    hidden, k, v = decoder_step(seq, memory, [], [], x, 0)  # (B, 1, 1, D)
    root = torch.zeros(b, 1, dtype=torch.long, device=dev)
    tree.alive[:, 0], tree.depth[:, 0], tree.tnode[:, 0], tree.anc[:, 0, 0] = True, 0, 0, 0
    tree.hidden[:, 0] = hidden[:, 0, 0]
    for kk, nk in zip(tree.keys, k):
        kk[:, 0] = nk[:, 0, :, 0]
    for vv, nv in zip(tree.values, v):
        vv[:, 0] = nv[:, 0, :, 0]
    depth0 = torch.zeros_like(root)
    path = hidden[:, :, 0][:, :, None].expand(-1, -1, trie.num_levels + 1, -1)  # (B, 1, L+1, D)
    tree.value[:, 0] = value(ValueQuery(path, depth0, root))[:, 0]
    rows = _child_rows(seq, trie, hidden[:, :, 0], depth0, root, exclude, v_max)  # (B, 1, V_max)
    tree.next_logp[:, 0] = rows[:, 0]
    tree.n_valid[:, 0] = torch.isfinite(rows[:, 0]).sum(-1)
    tree.entropy[:, 0] = _entropy(rows)[:, 0]
    tree.priority[:, 0] = cfg.value_weight * tree.value[:, 0] + cfg.entropy_weight * tree.entropy[:, 0]
    tree.visits[:, 0] = 1
    cost = torch.ones(b, dtype=torch.long, device=dev)
    frontier, start = root, 1
    for level in range(trie.num_levels):
        n_front = frontier.shape[1]
        scores = _take(tree.logp, frontier)[..., None] + _take(tree.next_logp, frontier)  # (B, F, V_max)
        scores = scores.masked_fill(~_take(tree.alive, frontier)[..., None], NEG_INF)
        k = min(cfg.init_beam, n_front * v_max, trie.num_nodes(level + 1))
        top, flat = scores.view(b, -1).topk(k, dim=1)  # (B, k)
        live = top > NEG_INF
        slots = start + torch.arange(k, device=dev).expand(b, k)  # (B, k)
        parent = frontier.gather(1, flat // v_max)
        _add_nodes(tree, seq, memory, trie, value, cfg, slots, parent, flat % v_max, live, exclude, v_max)
        cost += live.sum(1)
        frontier, start = slots, start + k
    tree.visits[:, 0] += tree.n_kids[:, 0]
    return cost, torch.full((b,), start, dtype=torch.long, device=dev)


def _select(tree: _Tree, cfg: VEDConfig, n_levels: int) -> torch.Tensor:
    """Stage 2 (Eq. 13): the path of each user, (B, L+1) slots, -1 past its end."""
    b = tree.alive.shape[0]
    path = torch.full((b, n_levels + 1), -1, dtype=torch.long, device=tree.alive.device)
    path[:, 0] = 0
    cur = torch.zeros(b, dtype=torch.long, device=path.device)
    going = torch.ones(b, dtype=torch.bool, device=path.device)
    explore = torch.log(tree.visits[:, :1].to(tree.priority.dtype) + 1)  # (B, 1) ln(N_root + 1)
    ucb = tree.priority + cfg.ucb_beta * torch.sqrt(explore / (tree.visits.to(tree.priority.dtype) + 1))  # (B, M+1)
    for step in range(1, n_levels + 1):
        kids = tree.alive & (tree.parent == cur[:, None]) & (tree.depth == step)  # (B, M+1)
        has = kids.any(1) & going
        nxt = ucb.masked_fill(~kids, NEG_INF).argmax(1)  # (B,) first of equal U
        cur = torch.where(has, nxt, cur)
        path[:, step] = torch.where(has, nxt, -1)
        going = has
    return path


def _depth_means(tree: _Tree, n_levels: int) -> torch.Tensor:
    """Eq. 14's mean G at each depth over each user's tree: (B, L+1)."""
    d = torch.where(tree.alive, tree.depth, n_levels + 1)  # (B, M+1), dead nodes to a spare bin
    total = torch.zeros(d.shape[0], n_levels + 2, dtype=tree.priority.dtype, device=d.device)
    total.scatter_add_(1, d, torch.where(tree.alive, tree.priority, 0.0))
    count = torch.zeros_like(total).scatter_add_(1, d, tree.alive.to(total.dtype))
    return (total / count.clamp_min(1))[:, : n_levels + 1]


@torch.no_grad()
def ved_decode(seq: Seq2Seq, batch: Batch, trie: PrefixTrie, cfg: VEDConfig, value: PrefixValue,
               exclude: torch.Tensor | None = None, gen: torch.Generator | None = None) -> VEDResult:
    """VED for the B users of `batch` (module docstring): `cfg.candidates` items per user."""
    n_levels, v_max = trie.num_levels, max(trie.level_sizes)
    memory = seq.encode(batch)
    b, dev = batch.history_codes.shape[0], batch.history_codes.device
    seed_slots = 1 + sum(min(cfg.init_beam, trie.num_nodes(level + 1)) for level in range(n_levels))
    m = seed_slots + cfg.budget  # seed slots (some may stay empty) + at most `budget` expansions
    att = seq.decoder[0].self_attn
    tree = _Tree(b, m, n_levels, v_max, seq.cfg.d_model, len(seq.decoder), att.h, att.dh, dev, seq.bos.dtype)
    cost, free = _init_tree(tree, seq, memory, trie, value, cfg, exclude, v_max)
    for _ in range(cfg.max_iters):
        active = cost < cfg.budget  # room for one more forward token
        if not bool(active.any()):
            break
        path = _select(tree, cfg, n_levels)  # (B, L+1)
        on_path = path >= 0
        tree.visits.scatter_add_(1, torch.where(on_path & active[:, None], path, tree.m),
                                 torch.ones_like(path))  # stage 4 for the traversal
        tree.visits[:, tree.m] = 0
        p = path.clamp_min(0)
        means = _depth_means(tree, n_levels)  # (B, L+1)
        depth = _take(tree.depth, p)  # (B, L+1)
        gate = (on_path & (depth < n_levels) & (_take(tree.n_kids, p) < _take(tree.n_valid, p))
                & (_take(tree.priority, p) >= means.gather(1, depth.clamp(0, n_levels))))  # (B, L+1)
        expand = gate.any(1) & active
        if not bool(expand.any()):
            continue
        last = (gate.long() * torch.arange(1, n_levels + 2, device=dev)).argmax(1)  # (B,) deepest qualifying
        node = p.gather(1, last[:, None])  # (B, 1)
        kids = tree.alive & (tree.parent == node)  # (B, M+1)
        taken = torch.zeros(b, v_max + 1, dtype=torch.bool, device=dev)
        idx = torch.where(kids, tree.code, v_max).clamp(0, v_max)
        taken.scatter_(1, idx, torch.ones_like(idx, dtype=torch.bool))
        rows = _take(tree.next_logp, node)[:, 0].masked_fill(taken[:, :v_max], NEG_INF)  # (B, V_max)
        has = torch.isfinite(rows).any(1)
        expand &= has
        if cfg.expand == "greedy":
            code = rows.argmax(1)
        else:
            probs = F.softmax(torch.where(has[:, None], rows, torch.zeros_like(rows)), dim=1)
            code = torch.multinomial(probs, 1, generator=gen)[:, 0]
        _add_nodes(tree, seq, memory, trie, value, cfg, free[:, None], node, code[:, None], expand[:, None],
                   exclude, v_max)
        cost += expand.long()
        free += expand.long()
    return _candidates(tree, trie, cfg.candidates, cost, v_max)


def _candidates(tree: _Tree, trie: PrefixTrie, c: int, cost: torch.Tensor, v_max: int) -> VEDResult:
    """Top-valued depth-L leaves, then unexpanded valid children of depth-(L-1) nodes from their cached rows."""
    n_levels = trie.num_levels
    b, dev = tree.alive.shape[0], tree.alive.device
    leaf = tree.alive & (tree.depth == n_levels)  # (B, M+1)
    n_leaves = leaf.sum(1)
    key = tree.value.masked_fill(~leaf, NEG_INF)
    order = key.sort(dim=1, descending=True, stable=True).indices  # (B, M+1)
    leaf_items = tree.tnode.gather(1, order).masked_fill(~leaf.gather(1, order), -1)  # (B, M+1)
    leaf_scores = key.gather(1, order)
    # Fill: children of depth-(L-1) nodes not in the tree, by the parent's V, then by pi.
    pre = tree.alive & (tree.depth == n_levels - 1)  # (B, M+1)
    rows = tree.next_logp.clone()  # (B, M+1, V_max)
    child_of = torch.where(leaf, tree.parent, tree.m)  # a leaf's parent slot
    taken = torch.zeros(b, tree.m + 1, v_max + 1, dtype=torch.bool, device=dev)
    idx = child_of * (v_max + 1) + torch.where(leaf, tree.code, v_max)
    taken.view(b, -1).scatter_(1, idx, torch.ones_like(idx, dtype=torch.bool))
    rows = rows.masked_fill(taken[..., :v_max] | ~pre[..., None], NEG_INF)
    ok = torch.isfinite(rows).view(b, -1)  # (B, (M+1) V_max)
    by_pi = rows.view(b, -1).sort(dim=1, descending=True, stable=True).indices
    parent_v = tree.value[:, :, None].expand_as(rows).reshape(b, -1).masked_fill(~ok, NEG_INF)
    order2 = by_pi.gather(1, parent_v.gather(1, by_pi).sort(dim=1, descending=True, stable=True).indices)  # (B, (M+1) V)
    fill_ok = ok.gather(1, order2)
    slot, code = order2 // v_max, order2 % v_max
    parent_node = torch.where(pre, tree.tnode, 0).gather(1, slot)  # (B, (M+1) V)
    fill_items = trie.next_nodes(n_levels - 1, parent_node, code.clamp_max(trie.level_sizes[-1] - 1))
    fill_items = fill_items.masked_fill(~fill_ok, -1)
    low = key.masked_fill(~leaf, float("inf")).amin(1, keepdim=True)  # (B, 1) the lowest leaf value
    floor = torch.where(n_leaves[:, None] > 0, low, torch.zeros_like(low))
    rank = torch.arange(fill_items.shape[1], device=dev, dtype=floor.dtype)
    fill_scores = (floor - 1.0 - rank).masked_fill(~fill_ok, NEG_INF)
    # Compact: live entries first, in order (leaves, then fill), then padding.
    items = torch.cat([leaf_items, fill_items], 1)
    scores = torch.cat([leaf_scores, fill_scores], 1)
    is_leaf = torch.cat([leaf.gather(1, order), torch.zeros_like(fill_ok)], 1)
    live = items >= 0
    pos = torch.where(live, torch.cumsum(live.long(), 1) - 1, items.shape[1])
    out_items = torch.full((b, items.shape[1] + 1), -1, dtype=torch.long, device=dev)
    out_scores = torch.full((b, items.shape[1] + 1), NEG_INF, dtype=scores.dtype, device=dev)
    out_leaf = torch.zeros((b, items.shape[1] + 1), dtype=torch.bool, device=dev)
    out_items.scatter_(1, pos, items)
    out_scores.scatter_(1, pos, scores)
    out_leaf.scatter_(1, pos, is_leaf)
    if out_items.shape[1] - 1 < c:
        pad = c - (out_items.shape[1] - 1)
        out_items = torch.cat([out_items[:, :-1], out_items.new_full((b, pad), -1)], 1)
        out_scores = torch.cat([out_scores[:, :-1], out_scores.new_full((b, pad), NEG_INF)], 1)
        out_leaf = torch.cat([out_leaf[:, :-1], out_leaf.new_zeros((b, pad))], 1)
    items, scores, from_leaf = out_items[:, :c], out_scores[:, :c], out_leaf[:, :c]
    codes = trie.ids.to(dev)[items.clamp_min(0)].masked_fill((items < 0)[..., None], -1)  # (B, C, L)
    return VEDResult(items, codes, scores.masked_fill(items < 0, NEG_INF), from_leaf & (items >= 0), cost, n_leaves)


@torch.no_grad()
def reference_ved(seq: Seq2Seq, batch: Batch, trie: PrefixTrie, cfg: VEDConfig, value: PrefixValue,
                  exclude: torch.Tensor | None = None) -> VEDResult:
    """The same algorithm per user, nodes as dicts, each node's state from a full teacher-forced
    `Seq2Seq.decode` of its prefix (no cache). Greedy expansion only (sampling draws differ)."""
    if cfg.expand != "greedy":
        raise ValueError("reference_ved: only expand='greedy' is reproducible node by node")
    n_levels, v_max = trie.num_levels, max(trie.level_sizes)
    memory = seq.encode(batch)
    b = batch.history_codes.shape[0]
    out_items, out_scores, out_leaf, costs, leaves_n = [], [], [], [], []
    for u in range(b):
        mem = type(memory)([k[u : u + 1] for k in memory.keys], [v[u : u + 1] for v in memory.values],
                           memory.mask[u : u + 1])
        excl = exclude[u : u + 1] if exclude is not None else None
        nodes: list[dict] = []

        def make(prefix: tuple[int, ...], parent: int, logp: float) -> dict:
            codes = torch.tensor([list(prefix)], dtype=torch.long)
            h = seq.decode(seq.embed_decoder_codes(codes), mem)  # (1, l+1, D)
            depth = len(prefix)
            tn = 0
            for level, code in enumerate(prefix):
                tn = int(trie.next_nodes(level, torch.tensor(tn), torch.tensor(code)))
            path = F.pad(h, (0, 0, 0, n_levels - depth))[:, None]  # (1, 1, L+1, D)
            rows_b = lambda t: t.expand(b, *t.shape[1:])  # noqa: E731  the value is bound to the batch's users
            v = float(value(ValueQuery(rows_b(path), rows_b(torch.tensor([[depth]])), rows_b(torch.tensor([[tn]]))))[u, 0])
            rows = _child_rows(seq, trie, h[:, -1:], torch.tensor([[depth]]), torch.tensor([[tn]]), excl, v_max)[0, 0]
            ent = float(_entropy(rows[None, None])[0, 0])
            g = cfg.value_weight * v + (cfg.entropy_weight * ent if depth < n_levels else 0.0)
            node = {"prefix": prefix, "parent": parent, "depth": depth, "tnode": tn, "logp": logp, "rows": rows,
                    "V": v, "G": g, "N": 1, "kids": {}, "valid": int(torch.isfinite(rows).sum())}
            nodes.append(node)
            if parent >= 0:
                nodes[parent]["kids"][prefix[-1]] = len(nodes) - 1
            return node

        make((), -1, 0.0)
        cost = 1
        frontier = [0]
        for level in range(n_levels):
            found = []
            for i in frontier:
                n = nodes[i]
                for code in range(v_max):
                    s = n["logp"] + float(n["rows"][code])
                    if s > NEG_INF:
                        found.append((-s, i, code))
            found.sort()
            frontier = []
            for s, i, code in found[: min(cfg.init_beam, trie.num_nodes(level + 1))]:
                make(nodes[i]["prefix"] + (code,), i, -s)
                frontier.append(len(nodes) - 1)
                cost += 1
        nodes[0]["N"] += len(nodes[0]["kids"])
        for _ in range(cfg.max_iters):
            if cost >= cfg.budget:
                break
            path, cur = [0], 0
            while nodes[cur]["kids"]:
                n_root = nodes[0]["N"]
                cur = max(sorted(nodes[cur]["kids"].values()),
                          key=lambda j: nodes[j]["G"] + cfg.ucb_beta * math.sqrt(math.log(n_root + 1) / (nodes[j]["N"] + 1)))
                path.append(cur)
            for j in path:
                nodes[j]["N"] += 1
            chosen = None
            for j in path:
                n = nodes[j]
                same = [x["G"] for x in nodes if x["depth"] == n["depth"]]
                if n["depth"] < n_levels and len(n["kids"]) < n["valid"] and n["G"] >= sum(same) / len(same):
                    chosen = j
            if chosen is None:
                continue
            n = nodes[chosen]
            rows = n["rows"].clone()
            rows[list(n["kids"])] = NEG_INF
            code = int(rows.argmax())
            make(n["prefix"] + (code,), chosen, n["logp"] + float(n["rows"][code]))
            cost += 1
        leaves = sorted((x for x in nodes if x["depth"] == n_levels), key=lambda x: -x["V"])
        items = [x["tnode"] for x in leaves]
        scores = [x["V"] for x in leaves]
        fill = []
        for i, x in enumerate(nodes):
            if x["depth"] == n_levels - 1:
                for code in range(v_max):
                    lp = float(x["rows"][code])
                    if lp > NEG_INF and code not in x["kids"]:
                        fill.append((-x["V"], -lp, i, code))
        fill.sort()
        low = min(scores) if scores else 0.0
        for r, (_, _, i, code) in enumerate(fill):
            items.append(int(trie.next_nodes(n_levels - 1, torch.tensor(nodes[i]["tnode"]), torch.tensor(code))))
            scores.append(low - 1.0 - r)
        is_leaf = [True] * len(leaves) + [False] * len(fill)
        pad = max(0, cfg.candidates - len(items))
        out_items.append((items + [-1] * pad)[: cfg.candidates])
        out_scores.append((scores + [NEG_INF] * pad)[: cfg.candidates])
        out_leaf.append((is_leaf + [False] * pad)[: cfg.candidates])
        costs.append(cost)
        leaves_n.append(len(leaves))
    items = torch.tensor(out_items, dtype=torch.long)
    codes = trie.ids[items.clamp_min(0)].masked_fill((items < 0)[..., None], -1)
    return VEDResult(items, codes, torch.tensor(out_scores), torch.tensor(out_leaf), torch.tensor(costs),
                     torch.tensor(leaves_n))


@torch.no_grad()
def rank_with_ved(seq: Seq2Seq, inst, table, trie: PrefixTrie, cfg: VEDConfig, value_for, batch_size: int = 64,
                  progress=None, exclude_history: bool = False):
    """VED's ranking for every instance, (N, C) items and scores, batch by batch (the method vstar_ved).
    `value_for(instances, exclude)` gives the `PrefixValue` of one batch of users (V_cf is per user)."""
    seq.eval()
    items, scores = [], []
    n_items = table.codes.shape[0]
    gen = torch.Generator(device=table.codes.device).manual_seed(0)  # used by expand="sample" only
    for start in range(0, len(inst), batch_size):
        part = inst.select(torch.arange(start, min(start + batch_size, len(inst))))
        exclude = history_mask(part.history.to(table.codes.device), n_items) if exclude_history else None
        res = ved_decode(seq, to_batch(part, table, with_target=False), trie, cfg, value_for(part, exclude), exclude, gen)
        items.append(res.items.cpu().numpy())
        scores.append(res.scores.float().cpu().numpy())
        if progress is not None:
            progress(len(part))
    return np.concatenate(items), np.concatenate(scores)
