"""Trie-constrained beam search over semantic IDs, model-agnostic, with a reference and a brute force.

The generation stage of GRC (and TIGER's retrieval, Rajput et al. 2023, Sec. 4) decodes an
item's L-level semantic ID code by code, keeping the `width` best prefixes by summed
log-probability and allowing only codes that extend the prefix of some item (`PrefixTrie`).
The model is driven through `StepModel` (encode once, then one decoder step per level), so the
same search runs a stub, a GRU or a T5 with its own KV cache.

Semantics, shared by all three functions:
- An item's score is the sum of the model's log-probs of its codes. The model normalises each
  level over its whole level vocabulary; the search sets invalid codes to -inf and does not
  renormalise, so the score equals what `exhaustive_topk` computes.
- A candidate whose score is -inf (an invalid code, or a valid one the model gives log-prob
  -inf) is never returned: such slots, and slots beyond the number of valid items, are padding
  (item -1, score -inf, codes -1).
- Ties: candidates are ranked by score, descending, then by the lower flattened index
  (parent beam, code), i.e. the earlier parent beam first, then the smaller code. Beams are
  themselves in that order, so with all scores equal the result is the items in lexicographic
  ID order. `exhaustive_topk` breaks ties by the smaller item index.

Departures from the paper: none in the search; the beam count at level l is
min(width, valid prefixes of length l+1 in the whole trie) rather than always `width`, which
only skips slots that would be padding.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, Sequence

import torch

from grc_core.trie import PrefixTrie


class StepModel(Protocol):
    def begin(self, batch: Any) -> tuple[torch.Tensor, Any]:
        """Encode the batch (B users); return log-probs of level 0, (B, 1, V_0), and a decoding state
        for 1 beam per user."""
        ...

    def advance(self, state: Any, parents: torch.Tensor, tokens: torch.Tensor, level: int) -> tuple[torch.Tensor, Any]:
        """Keep, for each new beam (B, W), the state of beam `parents[b, w]` (index into the previous beams),
        append `tokens[b, w]` (the code chosen at `level`), and return log-probs of level+1, (B, W, V_{level+1}),
        with the new state."""
        ...


class BeamResult(NamedTuple):
    """Top items per user, best first; padding where fewer than W valid items exist."""

    items: torch.Tensor  # (B, W) int64 item index, -1 for padding
    scores: torch.Tensor  # (B, W) summed log-probs, descending, -inf for padding
    codes: torch.Tensor  # (B, W, L) int64 semantic ID of each item, -1 for padding


def _check_logp(logp: torch.Tensor, users: int | None, beams: int, vocab: int, where: str) -> None:
    if logp.dim() != 3 or (users is not None and logp.shape[0] != users) or tuple(logp.shape[1:]) != (beams, vocab):
        want = f"({'B' if users is None else users}, {beams}, {vocab})"
        raise ValueError(f"{where}: the model returned log-probs of shape {tuple(logp.shape)}, expected {want}")


def _select(cand: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best entries per row of cand (B, M): (values (B, k), flat indices (B, k)) under the tie rule.

    torch.topk leaves the order of equal values open, so: take k+1, and only where the k-th and
    (k+1)-th finite values are equal (a tie across the cut) pick the cut's ties by lowest index;
    then order the k chosen by (value desc, index asc) with two stable sorts.
    """
    b, m = cand.shape
    if k < m:
        vals, idx = cand.topk(k + 1, dim=1)  # (B, k+1)
        cut = vals[:, k - 1]  # (B,)
        if bool(((vals[:, k] == cut) & (cut > float("-inf"))).any()):
            above = cand > cut[:, None]  # (B, M)
            tied = cand == cut[:, None]  # (B, M)
            need = k - above.sum(dim=1, keepdim=True)  # (B, 1)
            take = above | (tied & (tied.cumsum(dim=1) <= need))  # (B, M), exactly k per row
            idx = take.nonzero()[:, 1].view(b, k)  # (B, k) ascending index
        else:
            idx = idx[:, :k].sort(dim=1).values  # (B, k)
    else:
        idx = torch.arange(m, device=cand.device).expand(b, m)  # (B, M)
    vals = cand.gather(1, idx)  # (B, k)
    order = vals.sort(dim=1, descending=True, stable=True).indices  # index asc among equal values
    return vals.gather(1, order), idx.gather(1, order)


def _padded(items: torch.Tensor, scores: torch.Tensor, codes: torch.Tensor, width: int) -> BeamResult:
    """Mark -inf slots as padding and pad (B, k) results to (B, width)."""
    dead = scores == float("-inf")  # (B, k)
    items = items.masked_fill(dead, -1)
    codes = codes.masked_fill(dead[..., None], -1)
    short = width - scores.shape[1]
    if short > 0:
        b, length = codes.shape[0], codes.shape[2]
        items = torch.cat([items, items.new_full((b, short), -1)], dim=1)  # (B, W)
        scores = torch.cat([scores, scores.new_full((b, short), float("-inf"))], dim=1)  # (B, W)
        codes = torch.cat([codes, codes.new_full((b, short, length), -1)], dim=1)  # (B, W, L)
    return BeamResult(items, scores, codes)


def _beam_counts(trie: PrefixTrie, width: int, starts: int = 1) -> list[int]:
    """Beams kept after choosing the code at each level: never more than the valid prefixes
    (times the number of start beams, whose continuations are distinct beams)."""
    counts, prev = [], starts
    for level, size in enumerate(trie.level_sizes):
        prev = min(width, prev * size, starts * trie.num_nodes(level + 1))
        counts.append(prev)
    return counts


def _check_width(width: int, where: str) -> None:
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"{where}: width must be a positive int, got {width!r}")


class BeamTrace(NamedTuple):
    """The decoder state after the search, for continuing the returned beams (GRC's reflection).

    `state` holds the beams alive before the last level's choice; `parents` (B, W_last) gives,
    for each returned (unpadded) beam, its row in that state: the caller gathers with it.
    """

    state: Any
    parents: torch.Tensor  # (B, W_last) int64
    origin: torch.Tensor  # (B, W_last) int64 the start beam each returned beam descends from


@torch.inference_mode()
def beam_search(model: StepModel, batch: Any, trie: PrefixTrie, width: int,
                initial_scores: torch.Tensor | None = None, return_trace: bool = False,
                exclude: torch.Tensor | None = None, values: Sequence[torch.Tensor] | None = None,
                value_weight: float = 0.0, value_mode: str = "shallow") -> BeamResult | tuple[BeamResult, BeamTrace]:
    """Batched trie-constrained beam search: a top-k over (beams x codes) per user and level.

    Python loops run over levels only. See the module docstring for scores, padding and ties.
    `initial_scores` (B, W0): start from W0 beams per user (e.g. GRC's correction pass, one
    start beam per draft; -inf for a start beam that must not continue); `model.begin` then
    returns log-probs (B, W0, V_0). Continuations of different start beams are different beams
    even where their codes agree, so one item can come back more than once.
    `exclude` (B, N) bool: items a user must not get (e.g. their history); they are masked at
    the last level like invalid codes, so the beam fills up with the next-best allowed items.
    `values` (shallow fusion with a prefix value, grc_core/cf_value.py): per level l a (B, M_l)
    value of the node each code leads to (M_l nodes at level l+1; items at the last level); each
    level keeps the beams with the best log pi(y<=l) + value_weight * value(y<=l), and the returned
    scores are that sum at the last level. Without `values` (or at weight 0) the search is the plain one.
    `value_mode` "levelwise" fuses inside each level instead: the step log-prob of code c under a
    beam is log softmax over the allowed codes of (log pi(c | y<l) + value_weight * value(y<l c)),
    a per-level product of experts, and a beam's score is the sum of those (grc_core/cf_value.py;
    the rule a backbone trained with `cf_value.level_soft_targets` as a prior is decoded by).
    """
    _check_width(width, "beam_search")
    if value_mode not in ("shallow", "levelwise"):
        raise ValueError(f"beam_search: value_mode must be 'shallow' or 'levelwise', got {value_mode!r}")
    logp, state = model.begin(batch)  # (B, W0, V_0)
    starts = 1 if initial_scores is None else initial_scores.shape[1]
    _check_logp(logp, None, starts, trie.level_sizes[0], "beam_search: begin")
    b, device = logp.shape[0], logp.device
    nodes = torch.zeros(b, starts, dtype=torch.long, device=device)  # (B, W0) trie node of each beam
    if initial_scores is None:
        scores = torch.zeros(b, 1, dtype=logp.dtype, device=device)  # (B, 1)
    else:
        scores = initial_scores.to(device=device, dtype=logp.dtype)  # (B, W0)
    codes = torch.zeros(b, starts, 0, dtype=torch.long, device=device)  # (B, W0, 0)
    origin = torch.arange(starts, device=device).expand(b, starts)  # (B, W0)
    counts = _beam_counts(trie, width, starts)
    for level, size in enumerate(trie.level_sizes):
        if level > 0:
            logp, state = model.advance(state, parents, tokens, level - 1)  # (B, W', V_l)
            _check_logp(logp, b, nodes.shape[1], size, f"beam_search: advance at level {level - 1}")
        child = trie.children(level, nodes)  # (B, W', V_l) the trie mask as a lookup
        allowed = child >= 0  # (B, W', V_l)
        if exclude is not None and level == trie.num_levels - 1:
            banned = exclude.gather(1, child.clamp_min(0).view(b, -1)).view_as(child)  # (B, W', V_l)
            allowed &= ~banned
        fused = values is not None and value_weight != 0
        bonus = values[level].gather(1, child.clamp_min(0).view(b, -1)).view_as(child) if fused else None  # (B, W', V_l)
        if fused and value_mode == "levelwise":
            step = torch.where(allowed, logp + value_weight * bonus, float("-inf"))  # (B, W', V_l)
            norm = torch.logsumexp(step, -1, keepdim=True)  # (B, W', 1); -inf where nothing is allowed
            step = torch.where(torch.isfinite(norm), step - norm, float("-inf"))  # (B, W', V_l)
            scores, flat = _select((scores[..., None] + step).view(b, -1), counts[level])  # (B, W)
        else:
            cand = torch.where(allowed, scores[..., None] + logp, float("-inf"))  # (B, W', V_l)
            if not fused:
                scores, flat = _select(cand.view(b, -1), counts[level])  # (B, W)
            else:
                key, flat = _select((cand + value_weight * bonus).view(b, -1), counts[level])  # (B, W)
                last = level == trie.num_levels - 1
                scores = key if last else cand.view(b, -1).gather(1, flat)  # (B, W) log pi, or the fused key
        parents, tokens = flat // size, flat % size  # (B, W)
        nodes = child.view(b, -1).gather(1, flat)  # (B, W) node at level+1, item index at the last
        kept = codes.gather(1, parents[..., None].expand(-1, -1, level))  # (B, W, level)
        codes = torch.cat([kept, tokens[..., None]], dim=2)  # (B, W, level+1)
        origin = origin.gather(1, parents)  # (B, W)
        nodes = nodes.clamp_min(0)  # dead beams (score -inf) park at node 0; they stay -inf
    result = _padded(nodes, scores, codes, width)
    return (result, BeamTrace(state, parents, origin)) if return_trace else result


@torch.inference_mode()
def reference_beam_search(model: StepModel, batch: Any, trie: PrefixTrie, width: int) -> BeamResult:
    """The same search written per user and per beam in plain Python: slow, obvious, for parity tests.

    The model still receives batched calls of the same shapes as in `beam_search` (dead slots
    continue beam 0 with code 0); the selection is a Python sort of (-score, beam, code).
    """
    _check_width(width, "reference_beam_search")
    logp, state = model.begin(batch)  # (B, 1, V_0)
    _check_logp(logp, None, 1, trie.level_sizes[0], "reference_beam_search: begin")
    n_users, length = logp.shape[0], trie.num_levels
    beams = [[(logp.new_zeros(()), 0, ())] for _ in range(n_users)]  # per user: (score, node, codes)
    counts = _beam_counts(trie, width)
    for level, size in enumerate(trie.level_sizes):
        if level > 0:
            logp, state = model.advance(state, parents, tokens, level - 1)  # (B, W', V_l)
        parents = torch.zeros(n_users, counts[level], dtype=torch.long)
        tokens = torch.zeros(n_users, counts[level], dtype=torch.long)
        for u in range(n_users):
            found = []
            for w, (score, node, prefix) in enumerate(beams[u]):
                row = score + logp[u, w]  # (V_l,) same float arithmetic as the fast path
                kids = trie.children(level, torch.tensor(node)).tolist()  # (V_l,)
                for code in range(size):
                    nxt = kids[code]
                    if nxt >= 0 and float(row[code]) > float("-inf"):
                        found.append((-float(row[code]), w, code, row[code], nxt, prefix + (code,)))
            found.sort(key=lambda f: f[:3])
            kept = found[: counts[level]]
            beams[u] = [(f[3], f[4], f[5]) for f in kept]
            for w, f in enumerate(kept):
                parents[u, w], tokens[u, w] = f[1], f[2]
            # Dead slots: the fast path would carry some -inf beam; a real state for any beam will do.
            beams[u] += [(logp.new_tensor(float("-inf")), 0, (-1,) * (level + 1))] * (counts[level] - len(kept))
    items = torch.full((n_users, width), -1, dtype=torch.long)
    scores = torch.full((n_users, width), float("-inf"), dtype=logp.dtype)
    codes = torch.full((n_users, width, length), -1, dtype=torch.long)
    for u in range(n_users):
        for w, (score, node, prefix) in enumerate(beams[u]):
            if float(score) > float("-inf"):
                items[u, w], scores[u, w], codes[u, w] = node, score, torch.tensor(prefix)
    return BeamResult(items, scores, codes)


@torch.inference_mode()
def exhaustive_scores(model: StepModel, batch: Any, trie: PrefixTrie) -> torch.Tensor:
    """Score of every item for every user, (B, N): the model teacher-forced on each full ID.

    Runs one beam per item through the step interface, so memory is B x N x V; tiny catalogs only.
    """
    ids = trie.ids  # (N, L)
    n = ids.shape[0]
    logp, state = model.begin(batch)  # (B, 1, V_0)
    b = logp.shape[0]
    scores = torch.zeros(b, n, dtype=logp.dtype, device=logp.device)  # (B, N)
    parents = torch.zeros(b, n, dtype=torch.long, device=logp.device)  # (B, N) all from the single root beam
    for level in range(trie.num_levels):
        if level > 0:
            logp, state = model.advance(state, parents, ids[:, level - 1].expand(b, n), level - 1)  # (B, N, V_l)
            parents = torch.arange(n, device=logp.device).expand(b, n)  # (B, N) each item continues itself
        scores = scores + logp.expand(b, n, -1).gather(2, ids[:, level].expand(b, n)[..., None])[..., 0]  # (B, N)
    return scores


def exhaustive_topk(model: StepModel, batch: Any, trie: PrefixTrie, k: int) -> BeamResult:
    """The exact top-k items by summed log-prob (ties: smaller item index first), padded like beam_search."""
    _check_width(k, "exhaustive_topk")
    scores = exhaustive_scores(model, batch, trie)  # (B, N)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]  # (B, k')
    top = scores.gather(1, order)  # (B, k')
    return _padded(order, top, trie.ids.to(order.device)[order], k)
