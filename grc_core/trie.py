"""A prefix trie of valid semantic IDs, laid out for batched constrained decoding.

Constrained decoding (TIGER, Rajput et al. 2023, Sec. 4; GRC's generation stage) lets the
decoder emit only codes that extend a prefix of some item's ID. `PrefixTrie` stores, per level
l, the transitions (node at level l, code at level l) -> child node at level l+1: a node at level
l is a valid prefix of length l (the root is node 0 at level 0). At the last level the "child" is
the item index, so the trie is also phi (full ID -> item) with no separate lookup. The search
needs two batched lookups per level: `children(l, nodes)`, the (..., V_l) row of child ids (-1
where no item continues the prefix with that code), whose `>= 0` is the vocabulary mask, and
`next_nodes(l, nodes, codes)`.

Node ids at level l+1 are numbered by (parent node, code), i.e. breadth-first with the
children of a node contiguous and sorted by code, like `semantic_ids.prefix_edges`.

Two layouts per level, chosen by size (`dense_max_bytes`, 64 MiB by default), same answers:
- dense: a table (n_nodes_l, V_l) int64, 8 x n_nodes_l x V_l bytes; both lookups are one gather.
  Instruments (9,922 items, 4 x 256 codes plus a 3-code level; 1, 162, 6,996, 9,172 and 9,897
  nodes per level) takes 32 MiB this way, so every level of it is dense.
- csr: the level's edges sorted by key = node x V_l + code (that is breadth-first order), as
  `keys` and `targets`, 16 bytes per edge. `next_nodes` is a binary search of the keys;
  `children` finds each node's edge range [searchsorted(node V), searchsorted((node+1) V)) and
  scatters its edges into a -1 row. The dense layout grows as items x codebook size (a
  million items on 4 x 256 codes: about 2 GiB at level 3 alone); csr grows as items (about
  16 MiB per level there).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


DENSE_MAX_BYTES = 64 * 2**20


class PrefixTrie:
    """Per-level transitions over unique semantic IDs (N, L), dense or csr per level; see the module doc."""

    def __init__(self, dense: list[torch.Tensor | None], edges: list[tuple[torch.Tensor, torch.Tensor] | None],
                 level_sizes: Sequence[int], ids: torch.Tensor, node_counts: Sequence[int]):
        self._dense = dense  # per level: (n_nodes_l, V_l) int64 or None; last level: item indices
        self._edges = edges  # per level: (keys (E_l,), targets (E_l,)) int64, keys ascending, or None
        self._level_sizes = tuple(int(v) for v in level_sizes)
        self._node_counts = tuple(int(v) for v in node_counts)  # nodes at levels 0..L-1
        self.ids = ids  # (N, L) the ID of each item: the inverse of phi

    @classmethod
    def from_ids(cls, ids: np.ndarray | torch.Tensor, level_sizes: Sequence[int],
                 dense_max_bytes: int = DENSE_MAX_BYTES) -> "PrefixTrie":
        """Build the trie of item IDs (N, L), item n = row n; codes at level l lie in [0, level_sizes[l]).
        A level whose dense table would exceed `dense_max_bytes` is stored as csr (0: every level)."""
        c = ids.cpu().numpy() if torch.is_tensor(ids) else np.asarray(ids)
        sizes = [int(v) for v in level_sizes]
        if c.ndim != 2 or c.shape[0] == 0 or c.shape[1] == 0:
            raise ValueError(f"PrefixTrie.from_ids: ids must be a non-empty (N, L) array, got shape {c.shape}")
        if not np.issubdtype(c.dtype, np.integer):
            raise ValueError(f"PrefixTrie.from_ids: ids must be integers, got {c.dtype}")
        n, depth = c.shape
        if len(sizes) != depth or min(sizes) < 1:
            raise ValueError(
                f"PrefixTrie.from_ids: level_sizes {sizes} must give one size >= 1 for each of the L={depth} levels"
            )
        c = c.astype(np.int64)
        bad = (c < 0) | (c >= np.asarray(sizes))  # (N, L)
        if bad.any():
            row, level = map(int, np.argwhere(bad)[0])
            raise ValueError(
                f"PrefixTrie.from_ids: item {row} has code {c[row, level]} at level {level}, outside [0, {sizes[level]})"
            )
        node_of = np.zeros(n, dtype=np.int64)  # (N,) each item's node at the current level
        dense, edges, counts = [], [], []
        for level, size in enumerate(sizes):
            keys = node_of * size + c[:, level]  # (N,) row-major cell of (node, code)
            n_nodes = int(node_of.max()) + 1
            counts.append(n_nodes)
            if level == depth - 1:
                order = np.argsort(keys, kind="stable")
                same = np.flatnonzero(keys[order][1:] == keys[order][:-1])
                if len(same):
                    a, b = sorted((int(order[same[0]]), int(order[same[0] + 1])))
                    raise ValueError(
                        f"PrefixTrie.from_ids: items {a} and {b} share the ID {c[a].tolist()}; IDs must be unique per row"
                    )
                uniq, target = keys[order], order  # phi: full ID -> item
            else:
                uniq, inverse = np.unique(keys, return_inverse=True)  # sorted by (node, code): breadth-first
                target = np.arange(len(uniq), dtype=np.int64)
                node_of = inverse.reshape(-1)
            if n_nodes * size * 8 <= dense_max_bytes:
                table = np.full(n_nodes * size, -1, dtype=np.int64)
                table[uniq] = target
                dense.append(torch.from_numpy(table.reshape(n_nodes, size)))  # (n_nodes_l, V_l)
                edges.append(None)
            else:
                dense.append(None)
                edges.append((torch.from_numpy(uniq), torch.from_numpy(target)))  # (E_l,) x2
        return cls(dense, edges, sizes, torch.from_numpy(c), counts)

    @property
    def num_levels(self) -> int:
        return len(self._level_sizes)

    @property
    def level_sizes(self) -> tuple[int, ...]:
        return self._level_sizes

    @property
    def num_items(self) -> int:
        return int(self.ids.shape[0])

    @property
    def layouts(self) -> tuple[str, ...]:
        """"dense" or "csr" per level."""
        return tuple("dense" if t is not None else "csr" for t in self._dense)

    def num_nodes(self, level: int) -> int:
        """Valid prefixes of length `level` (1 at level 0; N at level L)."""
        return self.num_items if level == self.num_levels else self._node_counts[level]

    def level_nbytes(self, level: int) -> int:
        """Bytes of level `level`'s transitions: 8 n_nodes V (dense) or 16 per edge (csr)."""
        if self._dense[level] is not None:
            return self._dense[level].numel() * self._dense[level].element_size()
        return sum(t.numel() * t.element_size() for t in self._edges[level])

    @property
    def nbytes(self) -> int:
        """Bytes held by the transitions of all levels."""
        return sum(self.level_nbytes(level) for level in range(self.num_levels))

    def to(self, device: torch.device | str) -> "PrefixTrie":
        return PrefixTrie([None if t is None else t.to(device) for t in self._dense],
                          [None if e is None else (e[0].to(device), e[1].to(device)) for e in self._edges],
                          self._level_sizes, self.ids.to(device), self._node_counts)

    def children(self, level: int, nodes: torch.Tensor) -> torch.Tensor:
        """Child of each node (...) for every code at `level`: (..., V_l), -1 where the code is invalid;
        at the last level the item index. Nodes must be valid node ids at `level`."""
        table = self._dense[level]
        if table is not None:
            return table[nodes]  # (..., V_l)
        keys, targets = self._edges[level]
        size = self._level_sizes[level]
        flat = nodes.reshape(-1)  # (M,)
        lo = torch.searchsorted(keys, flat * size)  # (M,) first edge of each node
        count = torch.searchsorted(keys, (flat + 1) * size) - lo  # (M,) its number of edges
        out = torch.full((flat.numel() * size,), -1, dtype=targets.dtype, device=targets.device)  # (M V,)
        row = torch.repeat_interleave(torch.arange(flat.numel(), device=flat.device), count)  # (E',)
        first = torch.cumsum(count, 0) - count  # (M,) where each node's edges start in the (E',) list
        edge = torch.arange(row.numel(), device=flat.device) - first[row] + lo[row]  # (E',) into keys
        out[row * size + keys[edge] - flat[row] * size] = targets[edge]
        return out.view(*nodes.shape, size)

    def valid_mask(self, level: int, nodes: torch.Tensor) -> torch.Tensor:
        """Which codes at `level` extend each node's prefix: nodes (...) -> bool (..., V_l)."""
        return self.children(level, nodes) >= 0  # (..., V_l)

    def next_nodes(self, level: int, nodes: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Node at level+1 (the item index at the last level) for each (node, code), -1 if invalid; same shape.
        Codes must lie in [0, V_l)."""
        table = self._dense[level]
        if table is not None:
            return table[nodes, codes]
        keys, targets = self._edges[level]
        query = nodes * self._level_sizes[level] + codes  # (...)
        at = torch.searchsorted(keys, query.reshape(-1)).clamp_max(keys.numel() - 1).view_as(query)  # (...)
        return torch.where(keys[at] == query, targets[at], torch.full_like(query, -1))
