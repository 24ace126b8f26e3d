"""Semantic IDs: collisions, disambiguation, the ID -> item map phi and the prefix trie.

An item's codes (c_1..c_L) from a tokenizer need not be unique. TIGER (Rajput et al. 2023,
Sec. 3.1) appends a level that counts the items sharing a tuple; `disambiguate` does that.
`reassign_last_level` first moves colliding items to free last-level codes of their prefix
group (a greedy version of the balanced last-level assignment of LC-Rec's uniform semantic
mapping), so fewer items need the extra level. `lookup_table` / `item_for_ids` implement
phi (full ID -> item) and `prefix_edges` lays out the trie of valid prefixes that
constrained decoding walks.

Choices:
- Order within a collision group is by item index, so IDs depend only on the code matrix.
- `reassign_last_level` keeps the colliding item nearest to the shared code on it and gives
  the others free codes by global greedy matching (smallest distance first, ties by item
  index then code) instead of an optimal (Hungarian) or Sinkhorn assignment.
- `semantic_coherence` breaks a tie between most common level-1 codes toward the smaller
  code and returns NaN when no item has a known category.
- `tokenizer_inputs` (`tokenize.embedding`): what the quantiser sees. `text` is the text
  embedding; `cf` a collaborative model's item embeddings (SASRec's), so the first code groups
  items users consume together rather than items described alike (LETTER's collaborative
  alignment, without its joint training); `text_cf` both, each block L2-normalised per item and
  scaled by sqrt(1 - s) and sqrt(s) (s = `tokenize.cf_share`), so the concatenation is unit-norm
  and s is the share of the squared distance that comes from the collaborative block.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np
import torch

_TOKEN = re.compile(r"^<([a-z])_(\d+)>$")


def _as_codes(codes: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
    c = codes.cpu().numpy() if torch.is_tensor(codes) else np.asarray(codes)
    if c.ndim != 2 or c.shape[0] == 0 or c.shape[1] == 0:
        raise ValueError(f"{what}: codes must be a non-empty (N, L) integer array, got shape {c.shape}")
    if not np.issubdtype(c.dtype, np.integer):
        raise ValueError(f"{what}: codes must be integers, got {c.dtype}")
    if c.min() < 0:
        raise ValueError(f"{what}: codes must be >= 0, got {c.min()}")
    return c.astype(np.int64)


def collision_groups(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(group (N,), group size (N,)): items with equal code tuples share a group id."""
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)  # (N,)
    return inverse, counts[inverse]


def collision_rate(codes: np.ndarray | torch.Tensor) -> float:
    """Share of items whose full code tuple is shared with at least one other item."""
    c = _as_codes(codes, "collision_rate")
    _, size = collision_groups(c)
    return float((size > 1).mean())


def disambiguate(codes: np.ndarray | torch.Tensor) -> tuple[np.ndarray, int]:
    """TIGER's extra level: the item's rank (by item index) among items with the same codes.

    No collisions -> (codes, 0). Otherwise every item gets the level (unique items 0) and the
    second value is the largest collision group, the size of the extra level's vocabulary.
    """
    c = _as_codes(codes, "disambiguate")
    group, size = collision_groups(c)
    if size.max() == 1:
        return c.copy(), 0
    order = np.argsort(group, kind="stable")  # (N,) items by group, then by index
    sorted_group = group[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_group)) + 1]  # first position of each group
    rank_sorted = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    rank = np.empty_like(rank_sorted)
    rank[order] = rank_sorted
    return np.concatenate([c, rank[:, None]], axis=1), int(size.max())  # (N, L+1)


def colliding_movers(members: np.ndarray, codes: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Items of one prefix group that must leave their last code, sorted by index.

    On each last code shared by several members the member nearest to it (ties: lowest
    index) stays; the others move.
    """
    movers: list[int] = []
    last = codes[members, -1]  # (m,)
    for code in np.unique(last):
        items = members[last == code]
        if items.size > 1:
            stay = items[np.lexsort((items, dist[items, code]))[0]]
            movers.extend(int(i) for i in items if i != stay)
    return np.array(sorted(movers), dtype=np.int64)


def greedy_matching(movers: np.ndarray, free: np.ndarray, dist: np.ndarray) -> list[tuple[int, int]]:
    """(item, code) pairs, smallest distance first (ties: item index, then code), one each."""
    pair_d = dist[np.ix_(movers, free)].ravel()  # (M * F,)
    pair_item = np.repeat(movers, free.size)  # (M * F,)
    pair_code = np.tile(free, movers.size)  # (M * F,)
    taken_items: set[int] = set()
    taken_codes: set[int] = set()
    matches = []
    for j in np.lexsort((pair_code, pair_item, pair_d)):
        item, code = int(pair_item[j]), int(pair_code[j])
        if item in taken_items or code in taken_codes:
            continue
        matches.append((item, code))
        taken_items.add(item)
        taken_codes.add(code)
        if len(matches) == min(movers.size, free.size):
            break
    return matches


def reassign_last_level(
    codes: np.ndarray | torch.Tensor, last_level_distances: np.ndarray | torch.Tensor
) -> np.ndarray:
    """Move items that collide on all L codes to the nearest free last-level code of their prefix.

    Per prefix group (items sharing c_1..c_{L-1}): on each shared code the item with the
    smallest distance (ties: lowest index) stays; the others are matched greedily to codes
    the group does not use, smallest distance first. A group with more than K items keeps its
    excess colliding (they stay on their codes). Distances are (N, K), e.g. ||r_L - C_L[k]||^2.
    """
    c = _as_codes(codes, "reassign_last_level")
    d = last_level_distances.cpu().numpy() if torch.is_tensor(last_level_distances) else np.asarray(last_level_distances)
    if d.ndim != 2 or d.shape[0] != c.shape[0]:
        raise ValueError(f"reassign_last_level: distances must be (N={c.shape[0]}, K), got shape {d.shape}")
    k = d.shape[1]
    if c[:, -1].max() >= k:
        raise ValueError(f"reassign_last_level: last-level code {c[:, -1].max()} >= K={k}")
    out = c.copy()
    _, size = collision_groups(c)
    colliding = np.flatnonzero(size > 1)
    if colliding.size == 0:
        return out
    prefix_of = collision_groups(c[:, :-1])[0] if c.shape[1] > 1 else np.zeros(len(c), dtype=np.int64)
    by_prefix = np.argsort(prefix_of, kind="stable")  # (N,) items grouped by prefix, by index within
    bounds = np.searchsorted(prefix_of[by_prefix], np.arange(prefix_of.max() + 2))  # group p: bounds[p]:bounds[p+1]
    for prefix in np.unique(prefix_of[colliding]):
        members = by_prefix[bounds[prefix] : bounds[prefix + 1]]  # (m,)
        free = np.setdiff1d(np.arange(k), c[members, -1])  # (F,) sorted
        movers = colliding_movers(members, c, d)  # (M,)
        for item, code in greedy_matching(movers, free, d) if free.size else []:
            out[item, -1] = code
    return out


class LookupTable(NamedTuple):
    """phi: full semantic ID -> item index, as sorted mixed-radix keys."""

    radices: np.ndarray  # (L',) one past the largest code per level
    keys: np.ndarray  # (N,) sorted
    items: np.ndarray  # (N,) item index of each key


EMBEDDINGS = ("text", "cf", "text_cf")


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)  # (N, 1)
    return x / np.where(norm > 0, norm, 1.0)


def tokenizer_inputs(kind: str, text: np.ndarray | None, cf: np.ndarray | None, cf_share: float) -> np.ndarray:
    """The vectors the RQ-VAE (or rk-means) quantises, (N, D'), float32 (module docstring).

    text (N, D_t) item text embeddings; cf (N, D_c) collaborative item embeddings, row i = item i.
    """
    if kind not in EMBEDDINGS:
        raise ValueError(f"tokenize.embedding must be {' | '.join(EMBEDDINGS)}, got {kind!r}")
    needed = {"text": ("text",), "cf": ("cf",), "text_cf": ("text", "cf")}[kind]
    given = {"text": text, "cf": cf}
    for name in needed:
        x = given[name]
        if x is None or x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"tokenize.embedding={kind}: the {name} embeddings are missing or empty "
                             f"(shape {None if x is None else x.shape})")
    if kind == "text_cf":
        if text.shape[0] != cf.shape[0]:
            raise ValueError(f"tokenize.embedding=text_cf: {text.shape[0]} text rows for {cf.shape[0]} cf rows")
        if not 0.0 < cf_share < 1.0:
            raise ValueError(f"tokenize.cf_share must be in (0, 1) for text_cf, got {cf_share}")
        out = np.concatenate([np.sqrt(1.0 - cf_share) * _unit_rows(text), np.sqrt(cf_share) * _unit_rows(cf)], 1)
    elif kind == "cf":
        out = _unit_rows(cf)  # (N, D_c) the text embeddings are unit-norm too
    else:
        out = text
    return np.ascontiguousarray(out, dtype=np.float32)


def _keys(ids: np.ndarray, radices: np.ndarray) -> np.ndarray:
    strides = np.r_[np.cumprod(radices[::-1])[::-1][1:], 1].astype(np.int64)  # (L',)
    return ids @ strides  # (N,)


def lookup_table(ids: np.ndarray | torch.Tensor) -> LookupTable:
    """Build phi from unique IDs (N, L'); raises if two items share an ID."""
    c = _as_codes(ids, "lookup_table")
    radices = c.max(axis=0) + 1  # (L',)
    if np.prod(radices.astype(np.float64)) >= 2**62:
        raise ValueError(f"lookup_table: ID space {radices.tolist()} is too large for int64 keys")
    keys = _keys(c, radices)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    dup = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
    if dup.size:
        a, b = order[dup[0]], order[dup[0] + 1]
        raise ValueError(f"lookup_table: items {a} and {b} share the ID {c[a].tolist()}; disambiguate first")
    return LookupTable(radices, sorted_keys, order.astype(np.int64))


def item_for_ids(table: LookupTable, ids: np.ndarray | torch.Tensor) -> np.ndarray:
    """phi applied row-wise: item index (B,) of each ID (B, L'), -1 where no item has it."""
    q = ids.cpu().numpy() if torch.is_tensor(ids) else np.asarray(ids)
    if q.ndim != 2 or q.shape[1] != len(table.radices):
        raise ValueError(f"item_for_ids: ids must be (B, {len(table.radices)}), got shape {q.shape}")
    q = q.astype(np.int64)
    valid = ((q >= 0) & (q < table.radices)).all(axis=1)  # (B,)
    keys = _keys(np.where(valid[:, None], q, 0), table.radices)  # (B,)
    pos = np.searchsorted(table.keys, keys).clip(max=len(table.keys) - 1)
    found = valid & (table.keys[pos] == keys)
    return np.where(found, table.items[pos], -1)  # (B,)


class PrefixEdges(NamedTuple):
    """Edges of the trie of valid ID prefixes, one row per non-root node, in node-id order.

    The root is node 0 at level 0; a node at level l is a prefix of length l. Node ids are
    breadth-first, and the children of a node are contiguous and sorted by code.
    """

    level: np.ndarray  # (E,) 1..L'
    node: np.ndarray  # (E,) 1..E
    parent: np.ndarray  # (E,)
    code: np.ndarray  # (E,) code on the edge parent -> node
    item: np.ndarray  # (E,) item index for a leaf (level L'), else -1


def prefix_edges(ids: np.ndarray | torch.Tensor) -> PrefixEdges:
    """The prefix trie of unique IDs (N, L'), breadth-first."""
    c = _as_codes(ids, "prefix_edges")
    n, depth = c.shape
    node_of = np.zeros(n, dtype=np.int64)  # (N,) each item's node at the current level
    next_id = 1
    cols: dict[str, list[np.ndarray]] = {f: [] for f in PrefixEdges._fields}
    for level in range(1, depth + 1):
        pairs = np.stack([node_of, c[:, level - 1]], axis=1)  # (N, 2)
        uniq, first, inverse = np.unique(pairs, axis=0, return_index=True, return_inverse=True)  # sorted by (parent, code)
        nodes = next_id + np.arange(len(uniq))
        leaf = level == depth
        if leaf and len(uniq) != n:
            raise ValueError("prefix_edges: IDs are not unique; disambiguate first")
        cols["level"].append(np.full(len(uniq), level, dtype=np.int64))
        cols["node"].append(nodes)
        cols["parent"].append(uniq[:, 0])
        cols["code"].append(uniq[:, 1])
        cols["item"].append(first.astype(np.int64) if leaf else np.full(len(uniq), -1, dtype=np.int64))
        node_of = nodes[inverse.reshape(-1)]
        next_id += len(uniq)
    return PrefixEdges(*(np.concatenate(cols[f]).astype(np.int64) for f in PrefixEdges._fields))


def parse_prebuilt_codes(tokens: list[list[str]]) -> np.ndarray:
    """LC-Rec tokens [["<a_12>", "<b_7>", ...], ...] -> codes (N, L) int64.

    Level j's token must carry the j-th letter (a, b, c, ...); rows must have equal length.
    """
    if len(tokens) == 0:
        raise ValueError("parse_prebuilt_codes: no rows")
    width = len(tokens[0])
    if width == 0:
        raise ValueError("parse_prebuilt_codes: row 0 has no tokens")
    out = np.empty((len(tokens), width), dtype=np.int64)
    for i, row in enumerate(tokens):
        if len(row) != width:
            raise ValueError(f"parse_prebuilt_codes: row {i} has {len(row)} tokens, row 0 has {width}")
        for j, tok in enumerate(row):
            m = _TOKEN.match(tok) if isinstance(tok, str) else None
            if m is None:
                raise ValueError(f"parse_prebuilt_codes: row {i}, token {j} {tok!r} is not of the form '<a_12>'")
            expected = chr(ord("a") + j)
            if m.group(1) != expected:
                raise ValueError(
                    f"parse_prebuilt_codes: row {i}, token {j} {tok!r} is level {m.group(1)!r}, expected {expected!r}"
                )
            out[i, j] = int(m.group(2))
    return out


def semantic_coherence(level1_codes: np.ndarray | torch.Tensor, category_buckets: np.ndarray | torch.Tensor) -> float:
    """Share of items with a known category (bucket != 0) whose level-1 code is their category's mode."""
    codes = np.asarray(level1_codes.cpu() if torch.is_tensor(level1_codes) else level1_codes).astype(np.int64)
    cats = np.asarray(category_buckets.cpu() if torch.is_tensor(category_buckets) else category_buckets).astype(np.int64)
    if codes.ndim != 1 or codes.shape != cats.shape:
        raise ValueError(
            f"semantic_coherence: level1_codes and category_buckets must be (N,), got {codes.shape} and {cats.shape}"
        )
    known = cats != 0
    if not known.any():
        return float("nan")
    pairs, counts = np.unique(np.stack([cats[known], codes[known]], 1), axis=0, return_counts=True)
    # Most common code per category: sort by (category, -count, code) and take the first row.
    order = np.lexsort((pairs[:, 1], -counts, pairs[:, 0]))
    pairs, counts = pairs[order], counts[order]
    first = np.r_[True, pairs[1:, 0] != pairs[:-1, 0]]
    return float(counts[first].sum() / known.sum())
