"""GRPO rewards for the generate-reflect-correct episode (GRC paper, Sec. 4.2.2-4.2.3, Eqs. 13-22).

One episode is (history, draft z^(0), reflection r^, corrected z^(1)). Every function here is
vectorised over a flat batch of B episodes (users x G rollouts, flattened); rewards are (B,)
floating tensors on the device of the inputs. Shapes: semantic IDs (B, L) int64 (L levels,
positions t = 1..L, 1-based as in the paper); the predicted first-divergence position r^_loc
(B,) int64 in 1..L+1; attribute labels and value buckets (B, A) int64, where A is the paper's
K (number of semantic attributes: category, brand ...; this project's legend keeps K for the
codebook size).

    Eq. 14  token_hits             l = sum_t I[z_t = z^gt_t]                    (l0 for the draft, l1 corrected)
    Eq. 15  task_reward            R_task = l0 + beta_last * l1
    Eq. 4   first_divergence       r^gt_loc = min({t : z^(0)_t != z^gt_t} U {L+1})
    Eq. 5   attribute_consistency  r^gt_sem,k = I[f_k(i^(0)) = f_k(i^gt)]
    Eq. 17  loc_label_reward       R_loc-label = I[r^_loc = r^gt_loc]
    Eq. 18  loc_correction_reward  R_loc-cor = |E n C| / (|E| + eps),
                                   E = {t : t >= r^_loc}, C = {t : z^(0)_t != z^gt_t, z^(1)_t = z^gt_t}
            loc_reward             R_loc = R_loc-label + R_loc-cor
    Eq. 19  sem_label_reward       R_sem-label = mean_k I[r^_sem,k = r^gt_sem,k]
    Eq. 20  sem_correction_reward  R_sem-cor = mean_k I[r^_sem,k = 0, f_k(i^(0)) != f_k(i^gt), f_k(i^(1)) = f_k(i^gt)]
            sem_reward             R_sem = R_sem-label + R_sem-cor
    Eq. 21  delta_reward           R_delta = l1 - l0 if l1 > l0 else 0
    Eq. 16  correction_reward      R_cor = beta_loc R_loc + beta_sem R_sem + R_delta
    Eq. 13  total_reward           R = R_task + beta_cor R_cor
    Eq. 22  group_advantages       A_i = GRAdv(R_i; {R_j : j in group(i)})

`grc_rewards` composes them for one batch of episodes; `RewardConfig` holds the weights and the
switches for the paper's Table 3 ablations.

Where the paper is silent, this module chooses:
- Positions are 1-based (t in 1..L) and r_loc = L+1 means "no error", as in Eq. 4. A predicted
  r^_loc = L+1 gives an empty error region E, so R_loc-cor = 0 / (0 + eps) = 0: claiming the
  draft is right earns no correction credit, only the label credit of Eq. 17.
- With A = 0 attributes the means of Eqs. 19-20 are over an empty set; both rewards are 0 then
  (not NaN), so R_sem drops out rather than poisoning the total.
- The true semantic labels are computed from the attribute buckets (Eq. 5), so the caller passes
  buckets of the draft, corrected and target items rather than labels.
- An ablation switch that is off zeroes its entry in `grc_rewards`' output, so the returned
  dict is the reward actually trained on and cor = beta_loc loc + beta_sem sem + delta and
  total = task + beta_cor cor hold for every setting. l0 and l1 are measurements, always reported.
- GRAdv ("rank-normalizing returns within each user group") is read as: replace each reward by
  its average rank within its group (1-based; tied rewards share the mean of their ranks), then
  z-score those ranks within the group with the population std. mode="zscore" is the usual GRPO
  (R - mean) / (std + eps) on the raw rewards. In both modes a group of one episode, or a group
  whose rewards are all equal, gets advantage 0.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from grc_core.config import RewardConfig


def _check_ids(name: str, x: Tensor, dim: int) -> None:
    if x.dim() != dim or x.dtype.is_floating_point or x.dtype == torch.bool:
        raise ValueError(f"{name} must be a {dim}-d integer tensor, got {x.dim()}-d {x.dtype}")


def _check_same(names: str, *xs: Tensor) -> None:
    if len({tuple(x.shape) for x in xs}) != 1:
        raise ValueError(f"{names} must have the same shape, got {[tuple(x.shape) for x in xs]}")


def token_hits(codes: Tensor, target: Tensor) -> Tensor:
    """Eq. 14: number of positions t in 1..L where codes (B, L) equals target (B, L); (B,) float."""
    _check_ids("codes", codes, 2)
    _check_ids("target", target, 2)
    _check_same("codes and target", codes, target)
    return (codes == target).sum(dim=1).to(torch.get_default_dtype())  # (B,)


def task_reward(l0: Tensor, l1: Tensor, beta_last: float) -> Tensor:
    """Eq. 15: R_task = l0 + beta_last * l1."""
    return l0 + beta_last * l1


def first_divergence(codes: Tensor, target: Tensor) -> Tensor:
    """Eq. 4: 1-based first position where codes (B, L) differs from target, L+1 if nowhere; (B,) int64."""
    _check_ids("codes", codes, 2)
    _check_ids("target", target, 2)
    _check_same("codes and target", codes, target)
    diff = codes != target  # (B, L)
    first = diff.int().argmax(dim=1) + 1  # (B,) first True, or 1 when there is none
    return torch.where(diff.any(dim=1), first, codes.shape[1] + 1).long()  # (B,)


def attribute_consistency(attr_item: Tensor, attr_target: Tensor) -> Tensor:
    """Eq. 5: I[f_k(item) = f_k(target)] per attribute from value buckets (B, A); (B, A) int64."""
    _check_ids("attr_item", attr_item, 2)
    _check_ids("attr_target", attr_target, 2)
    _check_same("attr_item and attr_target", attr_item, attr_target)
    return (attr_item == attr_target).long()  # (B, A)


def loc_label_reward(r_loc_pred: Tensor, r_loc_true: Tensor) -> Tensor:
    """Eq. 17: I[r^_loc = r^gt_loc], both (B,); (B,) float."""
    _check_same("r_loc_pred and r_loc_true", r_loc_pred, r_loc_true)
    return (r_loc_pred == r_loc_true).to(torch.get_default_dtype())  # (B,)


def loc_correction_reward(r_loc_pred: Tensor, draft: Tensor, corrected: Tensor, target: Tensor,
                          eps: float = 1e-6) -> Tensor:
    """Eq. 18: |E n C| / (|E| + eps), E = {t >= r^_loc} the predicted error region (empty for r^_loc = L+1),
    C = {t : draft_t != target_t, corrected_t = target_t} the positions fixed; (B,) float.

    r_loc_pred (B,) must lie in 1..L+1; draft, corrected, target are (B, L).
    """
    for name, x in (("draft", draft), ("corrected", corrected), ("target", target)):
        _check_ids(name, x, 2)
    _check_same("draft, corrected and target", draft, corrected, target)
    _check_ids("r_loc_pred", r_loc_pred, 1)
    if r_loc_pred.shape[0] != draft.shape[0]:
        raise ValueError(f"r_loc_pred has {r_loc_pred.shape[0]} episodes, draft has {draft.shape[0]}")
    length = draft.shape[1]
    if r_loc_pred.numel() and not bool(((r_loc_pred >= 1) & (r_loc_pred <= length + 1)).all()):
        raise ValueError(f"r_loc_pred must lie in 1..{length + 1} (L+1 = no error), "
                         f"got values in {int(r_loc_pred.min())}..{int(r_loc_pred.max())}")
    t = torch.arange(1, length + 1, device=draft.device)  # (L,) 1-based positions
    region = t[None, :] >= r_loc_pred[:, None]  # (B, L) E
    fixed = (draft != target) & (corrected == target)  # (B, L) C
    dtype = torch.get_default_dtype()
    return (region & fixed).sum(dim=1).to(dtype) / (region.sum(dim=1).to(dtype) + eps)  # (B,)


def loc_reward(loc_label: Tensor, loc_cor: Tensor) -> Tensor:
    """R_loc = R_loc-label + R_loc-cor (Sec. 4.2.2, after Eq. 18)."""
    return loc_label + loc_cor


def sem_label_reward(r_sem_pred: Tensor, r_sem_true: Tensor) -> Tensor:
    """Eq. 19: mean over the A attributes of I[r^_sem,k = r^gt_sem,k], both (B, A); (B,) float, 0 when A = 0."""
    _check_ids("r_sem_pred", r_sem_pred, 2)
    _check_ids("r_sem_true", r_sem_true, 2)
    _check_same("r_sem_pred and r_sem_true", r_sem_pred, r_sem_true)
    return _mean_over_attributes(r_sem_pred == r_sem_true)


def sem_correction_reward(r_sem_pred: Tensor, attr_draft: Tensor, attr_corrected: Tensor,
                          attr_target: Tensor) -> Tensor:
    """Eq. 20: mean over k of I[r^_sem,k = 0, f_k(draft) != f_k(target), f_k(corrected) = f_k(target)].

    All inputs (B, A) int64 (reflection labels, then value buckets of the three items); (B,) float,
    0 when A = 0.
    """
    for name, x in (("r_sem_pred", r_sem_pred), ("attr_draft", attr_draft),
                    ("attr_corrected", attr_corrected), ("attr_target", attr_target)):
        _check_ids(name, x, 2)
    _check_same("r_sem_pred, attr_draft, attr_corrected and attr_target",
                r_sem_pred, attr_draft, attr_corrected, attr_target)
    fixed = (r_sem_pred == 0) & (attr_draft != attr_target) & (attr_corrected == attr_target)  # (B, A)
    return _mean_over_attributes(fixed)


def _mean_over_attributes(hits: Tensor) -> Tensor:
    """Mean of a (B, A) bool over A; zeros (B,) when A = 0 (the paper's 1/K is undefined there)."""
    dtype = torch.get_default_dtype()
    if hits.shape[1] == 0:
        return torch.zeros(hits.shape[0], dtype=dtype, device=hits.device)  # (B,)
    return hits.to(dtype).mean(dim=1)  # (B,)


def sem_reward(sem_label: Tensor, sem_cor: Tensor) -> Tensor:
    """R_sem = R_sem-label + R_sem-cor (Sec. 4.2.2, after Eq. 20)."""
    return sem_label + sem_cor


def delta_reward(l0: Tensor, l1: Tensor) -> Tensor:
    """Eq. 21: l1 - l0 where the corrected sequence strictly improves on the draft, else 0."""
    return (l1 - l0).clamp(min=0)


def correction_reward(r_loc: Tensor, r_sem: Tensor, r_delta: Tensor, beta_loc: float, beta_sem: float) -> Tensor:
    """Eq. 16: R_cor = beta_loc R_loc + beta_sem R_sem + R_delta."""
    return beta_loc * r_loc + beta_sem * r_sem + r_delta


def total_reward(r_task: Tensor, r_cor: Tensor, beta_cor: float) -> Tensor:
    """Eq. 13: R = R_task + beta_cor R_cor."""
    return r_task + beta_cor * r_cor


def grc_rewards(draft: Tensor, corrected: Tensor, target: Tensor, r_loc_pred: Tensor, r_sem_pred: Tensor,
                attr_draft: Tensor, attr_corrected: Tensor, attr_target: Tensor,
                cfg: RewardConfig) -> dict[str, Tensor]:
    """Every reward component of Eqs. 13-21 per episode, each (B,), with cfg's ablation switches applied.

    draft, corrected, target: (B, L) semantic IDs z^(0), z^(1), z^gt. r_loc_pred: (B,) in 1..L+1.
    r_sem_pred: (B, A) predicted consistency labels. attr_*: (B, A) value buckets of phi(z^(0)),
    phi(z^(1)) and the target item. Keys: l0, l1, task, loc_label, loc_cor, loc, sem_label, sem_cor,
    sem, delta, cor, total. A switched-off term is zeros (see the module docstring).
    """
    if draft.shape[0] != attr_draft.shape[0]:
        raise ValueError(f"draft has {draft.shape[0]} episodes, attr_draft has {attr_draft.shape[0]}")
    l0 = token_hits(draft, target)  # (B,)
    l1 = token_hits(corrected, target)  # (B,)
    zero = torch.zeros_like(l0)  # (B,)
    use_cor = cfg.use_cor
    out = {"l0": l0, "l1": l1, "task": task_reward(l0, l1, cfg.beta_last) if cfg.use_task else zero}
    if use_cor and cfg.use_loc:
        out["loc_label"] = loc_label_reward(r_loc_pred, first_divergence(draft, target))
        out["loc_cor"] = loc_correction_reward(r_loc_pred, draft, corrected, target, cfg.eps)
    else:
        out["loc_label"], out["loc_cor"] = zero, zero
    out["loc"] = loc_reward(out["loc_label"], out["loc_cor"])
    if use_cor and cfg.use_sem:
        out["sem_label"] = sem_label_reward(r_sem_pred, attribute_consistency(attr_draft, attr_target))
        out["sem_cor"] = sem_correction_reward(r_sem_pred, attr_draft, attr_corrected, attr_target)
    else:
        out["sem_label"], out["sem_cor"] = zero, zero
    out["sem"] = sem_reward(out["sem_label"], out["sem_cor"])
    out["delta"] = delta_reward(l0, l1) if use_cor and cfg.use_delta else zero
    out["cor"] = correction_reward(out["loc"], out["sem"], out["delta"], cfg.beta_loc, cfg.beta_sem)
    out["total"] = total_reward(out["task"], out["cor"], cfg.beta_cor)
    return out


def group_advantages(rewards: Tensor, group: Tensor, mode: Literal["zscore", "rank"] = "zscore",
                     eps: float = 1e-6) -> Tensor:
    """Eq. 22: group-relative advantage of each episode among the episodes of its user group.

    rewards (B,) float, group (B,) integer ids (any values, any order). "zscore": (R - mean_g) / (std_g + eps);
    "rank": the same on average within-group ranks (ties share their mean rank). Population std;
    singleton or constant groups get 0. Returns (B,) in the rewards' dtype.
    """
    if rewards.dim() != 1 or not rewards.dtype.is_floating_point:
        raise ValueError(f"rewards must be a 1-d float tensor, got {rewards.dim()}-d {rewards.dtype}")
    _check_ids("group", group, 1)
    _check_same("rewards and group", rewards, group)
    if mode not in ("zscore", "rank"):
        raise ValueError(f"mode must be 'zscore' or 'rank', got {mode!r}")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards must be finite; a NaN or inf would spread to its whole group")
    _, inv = torch.unique(group, return_inverse=True)  # (B,) dense group index 0..G'-1
    n_groups = int(inv.max()) + 1 if inv.numel() else 0
    values = _average_ranks(rewards, inv, n_groups) if mode == "rank" else rewards
    return _zscore(values, inv, n_groups, eps)


def _zscore(values: Tensor, inv: Tensor, n_groups: int, eps: float) -> Tensor:
    counts = torch.bincount(inv, minlength=n_groups).to(values.dtype)  # (G',)
    mean = values.new_zeros(n_groups).index_add_(0, inv, values) / counts  # (G',)
    dev = values - mean[inv]  # (B,); exactly 0 in a singleton group
    var = values.new_zeros(n_groups).index_add_(0, inv, dev * dev) / counts  # (G',)
    return dev / (var.sqrt()[inv] + eps)  # (B,)


def _average_ranks(values: Tensor, inv: Tensor, n_groups: int) -> Tensor:
    """1-based rank of each value within its group, ties given the mean of the ranks they span; (B,)."""
    n = values.shape[0]
    order = torch.argsort(values, stable=True)  # (B,) by value
    order = order[torch.argsort(inv[order], stable=True)]  # (B,) by group, then value
    g, v = inv[order], values[order]  # (B,) sorted
    counts = torch.bincount(inv, minlength=n_groups)  # (G',)
    starts = torch.cumsum(counts, 0) - counts  # (G',) first sorted slot of each group
    pos = (torch.arange(n, device=values.device) - starts[g]).to(values.dtype)  # (B,) 0-based rank in group
    new_run = torch.ones(n, dtype=torch.bool, device=values.device)  # (B,)
    new_run[1:] = (g[1:] != g[:-1]) | (v[1:] != v[:-1])
    run = torch.cumsum(new_run, 0) - 1  # (B,) id of each run of equal (group, value)
    run_sum = values.new_zeros(n).index_add_(0, run, pos)  # (B,) runs <= B
    run_len = torch.bincount(run, minlength=n).to(values.dtype)  # (B,)
    ranks = torch.empty_like(values)  # (B,)
    ranks[order] = run_sum[run] / run_len[run] + 1
    return ranks
