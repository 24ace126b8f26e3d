"""A dense prefix trie of valid semantic IDs, laid out for batched constrained decoding.

Constrained decoding (TIGER, Rajput et al. 2023, Sec. 4; GRC's generation stage) lets the
decoder emit only codes that extend a prefix of some item's ID. `PrefixTrie` stores, per level
l, a transition table `child[l]` of shape (n_nodes_l, V_l): row = a node at level l (a valid
prefix of length l, the root is node 0 at level 0), column = the code at level l, value = the
child node at level l+1 or -1 where no item continues the prefix with that code. At the last
level the "child" is the item index, so the trie is also phi (full ID -> item) with no separate
lookup. Masking a beam's vocabulary and stepping its node are then single gathers:
`child[l][nodes]` and `child[l][nodes, codes]`.

Node ids at level l+1 are numbered by (parent node, code), i.e. breadth-first with the
children of a node contiguous and sorted by code, like `semantic_ids.prefix_edges`.

Memory: sum over levels of n_nodes_l x V_l x 8 bytes (int64). For Instruments (9,922 items,
4 x 256 codes plus a 3-code disambiguation level; 1, 162, 6,996, 9,172 and 9,897 nodes per level)
that is 32 MiB, almost all of it levels 2 and 3. The dense layout grows as items x codebook size,
so millions of items need a sparse layout (CSR rows of (code, child) pairs per node, or a bitmask
per node plus a rank); that is a later issue.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


class PrefixTrie:
    """Dense per-level transition tables over unique semantic IDs (N, L); see the module doc."""

    def __init__(self, child: list[torch.Tensor], level_sizes: Sequence[int], ids: torch.Tensor):
        self.child = child  # [(n_nodes_l, V_l) int64]; at the last level the values are item indices
        self._level_sizes = tuple(int(v) for v in level_sizes)
        self.ids = ids  # (N, L) the ID of each item: the inverse of phi

    @classmethod
    def from_ids(cls, ids: np.ndarray | torch.Tensor, level_sizes: Sequence[int]) -> "PrefixTrie":
        """Build the trie of item IDs (N, L), item n = row n; codes at level l lie in [0, level_sizes[l])."""
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
        child = []
        for level, size in enumerate(sizes):
            keys = node_of * size + c[:, level]  # (N,) row-major cell of (node, code)
            uniq, inverse = np.unique(keys, return_inverse=True)  # sorted by (node, code): breadth-first
            n_nodes = int(node_of.max()) + 1
            table = np.full(n_nodes * size, -1, dtype=np.int64)
            if level == depth - 1:
                if len(uniq) != n:
                    order = np.argsort(keys, kind="stable")
                    first = np.flatnonzero(keys[order][1:] == keys[order][:-1])[0]
                    a, b = sorted((int(order[first]), int(order[first + 1])))
                    raise ValueError(
                        f"PrefixTrie.from_ids: items {a} and {b} share the ID {c[a].tolist()}; IDs must be unique per row"
                    )
                table[keys] = np.arange(n)  # phi: full ID -> item
            else:
                table[uniq] = np.arange(len(uniq))
                node_of = inverse.reshape(-1)
            child.append(torch.from_numpy(table.reshape(n_nodes, size)))  # (n_nodes_l, V_l)
        return cls(child, sizes, torch.from_numpy(c))

    @property
    def num_levels(self) -> int:
        return len(self._level_sizes)

    @property
    def level_sizes(self) -> tuple[int, ...]:
        return self._level_sizes

    @property
    def num_items(self) -> int:
        return int(self.ids.shape[0])

    def num_nodes(self, level: int) -> int:
        """Valid prefixes of length `level` (1 at level 0; N at level L)."""
        return self.num_items if level == self.num_levels else int(self.child[level].shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes held by the transition tables: sum_l n_nodes_l x V_l x 8."""
        return sum(t.numel() * t.element_size() for t in self.child)

    def to(self, device: torch.device | str) -> "PrefixTrie":
        return PrefixTrie([t.to(device) for t in self.child], self._level_sizes, self.ids.to(device))

    def valid_mask(self, level: int, nodes: torch.Tensor) -> torch.Tensor:
        """Which codes at `level` extend each node's prefix: nodes (...) -> bool (..., V_l)."""
        return self.child[level][nodes] >= 0  # (..., V_l)

    def next_nodes(self, level: int, nodes: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Node at level+1 (the item index at the last level) for each (node, code), -1 if invalid; same shape."""
        return self.child[level][nodes, codes]
