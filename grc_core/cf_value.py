"""The collaborative prefix value: what a collaborative model says of a semantic-ID prefix.

For a user x and a prefix y<=l of the item IDs, V_cf(x, y<=l) = log sum_{items i under y<=l}
p_cf(i | x), where p_cf is a collaborative model's distribution over items (here SASRec's
softmax over the catalog). It is exact for every node of the prefix trie, computed from one
score vector per user with one segment log-sum-exp per level (no loop over items).

Used as shallow fusion in the constrained beam search (`beam_search(..., values=, value_weight=)`):
each level prunes on log pi(y<=l | x) + w * V_cf(x, y<=l), so the collaborative model steers the
first codes, where most of TIGER's drafts already go wrong; at the last level the ranking score
is log pi(y | x) + w * log p_cf(item | x). Not in the GRC, TIGER or V-STAR papers: V-STAR learns
a prefix value from the policy's own states; this one is read off a second model. Items the user
must not get (the history, `exclude`) carry no mass.

The same sums also teach (`level_soft_targets`, the backbone's `cf_distill`): at level l of a
training target y, the collaborative model's distribution over the next code given the target's
own first l codes, q_l(c) = sum_{i under y<l, c} p_cf(i | x)^(1/T) / sum_{i under y<l} p_cf(i | x)^(1/T),
a soft label the backbone's cross-entropy at that level is mixed with.
"""

from __future__ import annotations

import torch

from grc_core.trie import PrefixTrie


def item_prefix_nodes(trie: PrefixTrie) -> list[torch.Tensor]:
    """For levels l = 1..L-1, the trie node (at level l) of each item's prefix of length l: (N,) each."""
    ids = trie.ids  # (N, L)
    nodes = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)  # (N,) the root
    out = []
    for level in range(trie.num_levels - 1):
        nodes = trie.next_nodes(level, nodes, ids[:, level])  # (N,) node at level + 1
        out.append(nodes)
    return out


def segment_logsumexp(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """(B, N) values, (N,) segment of each column in [0, size) -> (B, size) log-sum-exp per
    segment; an empty segment, or one whose values are all -inf, gives -inf."""
    b = values.shape[0]
    idx = index.expand(b, -1)  # (B, N)
    top = torch.full((b, size), float("-inf"), dtype=values.dtype, device=values.device)
    top = top.scatter_reduce(1, idx, values, reduce="amax", include_self=True)  # (B, S)
    safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # (B, S)
    total = torch.zeros_like(top).scatter_add(1, idx, (values - safe.gather(1, idx)).exp())  # (B, S)
    return total.log() + safe  # log 0 = -inf for empty segments


def prefix_values(item_logp: torch.Tensor, prefix_nodes: list[torch.Tensor], trie: PrefixTrie,
                  exclude: torch.Tensor | None = None) -> list[torch.Tensor]:
    """V_cf for every node: a list over levels l = 0..L-1 of (B, nodes at level l+1) tensors, the
    last one (B, N) item log-probabilities, as `beam_search` reads them (indexed by the child
    a code leads to). `item_logp` (B, N): log p_cf(i | x); `exclude` (B, N) bool: no mass."""
    logp = item_logp if exclude is None else item_logp.masked_fill(exclude, float("-inf"))  # (B, N)
    out = [segment_logsumexp(logp, nodes, trie.num_nodes(level + 1))
           for level, nodes in enumerate(prefix_nodes)]
    return out + [logp]


def level_soft_targets(item_logp: torch.Tensor, prefix_nodes: list[torch.Tensor], trie: PrefixTrie,
                       target_codes: torch.Tensor, temperature: float = 1.0) -> list[torch.Tensor]:
    """The collaborative model's next-code distribution under each teacher-forced prefix.

    `item_logp` (B, N): log p_cf(i | x); `prefix_nodes` from `item_prefix_nodes(trie)`;
    `target_codes` (B, L): the training targets' IDs. Returns, per level l, (B, V_l)
    log q_l(c | x, y<l): V_cf of the child y<l·c (from `prefix_values`, tempered by 1/`temperature`)
    renormalised over the codes; a code with no child gets none (the target's own always has one).
    """
    if temperature <= 0:
        raise ValueError(f"level_soft_targets: temperature must be > 0, got {temperature}")
    values = prefix_values(item_logp / temperature, prefix_nodes, trie)  # per level (B, nodes at l+1)
    node = torch.zeros(target_codes.shape[0], dtype=torch.long, device=target_codes.device)  # (B,) the root
    out = []
    for level, value in enumerate(values):
        kids = trie.children(level, node)  # (B, V_l), -1 where no item continues the prefix
        mass = value.gather(1, kids.clamp_min(0)).masked_fill(kids < 0, float("-inf"))  # (B, V_l)
        out.append(torch.log_softmax(mass, -1))
        node = trie.next_nodes(level, node, target_codes[:, level])  # (B,) the target's prefix, one code longer
    return out
