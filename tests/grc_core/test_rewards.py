import dataclasses

import pytest
import torch

from grc_core.rewards import (
    RewardConfig,
    attribute_consistency,
    correction_reward,
    delta_reward,
    first_divergence,
    grc_rewards,
    group_advantages,
    loc_correction_reward,
    loc_label_reward,
    loc_reward,
    sem_correction_reward,
    sem_label_reward,
    sem_reward,
    task_reward,
    token_hits,
    total_reward,
)


def paper_rewards(**changes) -> RewardConfig:
    """The paper's weights (params.yaml's grpo.reward), every term on, with `changes`."""
    return RewardConfig(**{"beta_cor": 2.2, "beta_last": 2.0, "beta_loc": 1.0, "beta_sem": 0.8, "eps": 1e-6,
                           "use_task": True, "use_cor": True, "use_loc": True, "use_sem": True, "use_delta": True,
                           **changes})


ABS = 1e-5


def t(*rows):
    return torch.tensor(rows, dtype=torch.long)


def close(actual, expected, tol=ABS):
    expected = torch.tensor(expected, dtype=actual.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected, rtol=0, atol=tol), (actual.tolist(), expected.tolist())


# The worked episode (L = 4) used throughout, with a second row where the draft is already right
# and a third where the correction makes things worse.
TARGET = t([1, 2, 3, 4], [5, 6, 7, 8], [1, 1, 1, 1])
DRAFT = t([1, 2, 9, 9], [5, 6, 7, 8], [1, 1, 0, 0])
CORRECTED = t([1, 2, 3, 9], [5, 6, 7, 8], [0, 1, 1, 0])


def test_token_hits():
    # row 0: draft hits t = 1, 2 -> 2; corrected hits t = 1, 2, 3 -> 3
    # row 1: all 4 hit; row 2: draft hits t = 1, 2 -> 2, corrected t = 2, 3 -> 2
    close(token_hits(DRAFT, TARGET), [2.0, 4.0, 2.0])
    close(token_hits(CORRECTED, TARGET), [3.0, 4.0, 2.0])
    assert token_hits(DRAFT, TARGET).dtype == torch.get_default_dtype()
    with pytest.raises(ValueError, match="same shape"):
        token_hits(DRAFT[:, :3], TARGET)
    with pytest.raises(ValueError, match="integer"):
        token_hits(DRAFT.float(), TARGET)


def test_task_reward():
    # 2 + 2.0 * 3 = 8; 4 + 2.0 * 4 = 12; 0 + 0.5 * 1 = 0.5
    close(task_reward(torch.tensor([2.0, 4.0, 0.0]), torch.tensor([3.0, 4.0, 1.0]), 2.0), [8.0, 12.0, 2.0])
    close(task_reward(torch.tensor([0.0]), torch.tensor([1.0]), 0.5), [0.5])


def test_first_divergence():
    # row 0 differs first at t = 3; row 1 nowhere -> L + 1 = 5; row 2 at t = 3
    r = first_divergence(DRAFT, TARGET)
    assert r.tolist() == [3, 5, 3] and r.dtype == torch.int64
    # differs at t = 1 and only at t = L
    assert first_divergence(t([9, 2, 3, 4], [1, 2, 3, 0]), t([1, 2, 3, 4], [1, 2, 3, 4])).tolist() == [1, 4]


def test_attribute_consistency():
    # f(draft) = (10, 21) vs f(target) = (10, 20) -> labels (1, 0)
    assert attribute_consistency(t([10, 21], [3, 3]), t([10, 20], [3, 3])).tolist() == [[1, 0], [1, 1]]


def test_loc_label_reward():
    close(loc_label_reward(t(3, 5, 1), t(3, 4, 1)), [1.0, 0.0, 1.0])


def test_loc_correction_reward():
    # row 0, r^ = 3: E = {3, 4}; C = {t : draft != target, corrected == target} = {3} -> 1 / (2 + eps)
    # row 1, r^ = 5 = L+1: E empty -> 0 / (0 + eps) = 0
    # row 2, r^ = 1: E = {1, 2, 3, 4}; draft wrong at 3, 4; corrected right at 3 -> C = {3} -> 1 / 4
    eps = 1e-6
    close(loc_correction_reward(t(3, 5, 1), DRAFT, CORRECTED, TARGET, eps), [1 / (2 + eps), 0.0, 0.25])
    # row 0 with r^ = 4: E = {4}, E n C = {} -> 0; a large eps shows it is used: 1 / (2 + 1) = 1/3
    close(loc_correction_reward(t(4), DRAFT[:1], CORRECTED[:1], TARGET[:1]), [0.0])
    close(loc_correction_reward(t(3), DRAFT[:1], CORRECTED[:1], TARGET[:1], eps=1.0), [1 / 3])
    with pytest.raises(ValueError, match="1..5"):
        loc_correction_reward(t(6, 1, 1), DRAFT, CORRECTED, TARGET)
    with pytest.raises(ValueError, match="1..5"):
        loc_correction_reward(t(0, 1, 1), DRAFT, CORRECTED, TARGET)


def test_loc_reward():
    close(loc_reward(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.25])), [1.5, 0.25])


def test_sem_label_reward():
    # row 0: pred (1, 0) vs true (1, 0) -> 2/2 = 1; row 1: pred (0, 0) vs true (1, 0) -> 1/2
    close(sem_label_reward(t([1, 0], [0, 0]), t([1, 0], [1, 0])), [1.0, 0.5])
    # A = 3: matches at k = 1, 3 -> 2/3
    close(sem_label_reward(t([1, 1, 0]), t([1, 0, 0])), [2 / 3])
    # A = 0: zeros, not NaN
    empty = torch.zeros(2, 0, dtype=torch.long)
    close(sem_label_reward(empty, empty), [0.0, 0.0])


def test_sem_correction_reward():
    # target buckets (10, 20, 30)
    # row 0: pred (1, 0, 0); draft (10, 21, 31); corrected (10, 20, 31)
    #   k=1: pred 1 -> 0; k=2: pred 0, 21 != 20, 20 == 20 -> 1; k=3: corrected 31 != 30 -> 0  => 1/3
    # row 1: pred (0, 0, 0); draft (11, 20, 31); corrected (10, 20, 30)
    #   k=1: 11 != 10, 10 == 10 -> 1; k=2: draft already right -> 0; k=3: 1  => 2/3
    # row 2: same items as row 1 but pred (1, 1, 1): no attribute flagged -> 0
    pred = t([1, 0, 0], [0, 0, 0], [1, 1, 1])
    a_draft = t([10, 21, 31], [11, 20, 31], [11, 20, 31])
    a_cor = t([10, 20, 31], [10, 20, 30], [10, 20, 30])
    a_tgt = t([10, 20, 30], [10, 20, 30], [10, 20, 30])
    close(sem_correction_reward(pred, a_draft, a_cor, a_tgt), [1 / 3, 2 / 3, 0.0])
    empty = torch.zeros(3, 0, dtype=torch.long)
    close(sem_correction_reward(empty, empty, empty, empty), [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="same shape"):
        sem_correction_reward(pred[:, :2], a_draft, a_cor, a_tgt)


def test_sem_reward():
    close(sem_reward(torch.tensor([1.0, 0.5]), torch.tensor([0.5, 0.0])), [1.5, 0.5])


def test_delta_reward():
    # 3 - 2 = 1; 4 vs 4 -> 0; 1 < 3 -> 0 (not -2)
    close(delta_reward(torch.tensor([2.0, 4.0, 3.0]), torch.tensor([3.0, 4.0, 1.0])), [1.0, 0.0, 0.0])


def test_correction_reward():
    # 1.0 * 1.5 + 0.8 * 1.5 + 1 = 3.7; 2 * 0 + 0.5 * 2 + 0 = 1
    close(correction_reward(torch.tensor([1.5]), torch.tensor([1.5]), torch.tensor([1.0]), 1.0, 0.8), [3.7])
    close(correction_reward(torch.tensor([0.0]), torch.tensor([2.0]), torch.tensor([0.0]), 2.0, 0.5), [1.0])


def test_total_reward():
    # 8 + 2.2 * 3.7 = 16.14
    close(total_reward(torch.tensor([8.0, 6.0]), torch.tensor([3.7, 0.0]), 2.2), [16.14, 6.0])
    # w/o beta: 1 + 0 * 5 = 1
    close(total_reward(torch.tensor([1.0]), torch.tensor([5.0]), 0.0), [1.0])


def test_reward_config_defaults_and_guard():
    cfg = paper_rewards()
    assert (cfg.beta_cor, cfg.beta_last, cfg.beta_loc, cfg.beta_sem, cfg.eps) == (2.2, 2.0, 1.0, 0.8, 1e-6)
    assert cfg.use_task and cfg.use_cor and cfg.use_loc and cfg.use_sem and cfg.use_delta
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.beta_cor = 1.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="eps"):
        paper_rewards(eps=0.0)


# Attributes for the three episodes (A = 2), target buckets (10, 20):
#   row 0: draft (10, 21), corrected (10, 20), pred labels (1, 0) = true labels
#   row 1: draft = corrected = target item, pred (1, 1) = true
#   row 2: draft (11, 20), corrected (11, 21), pred (1, 1) vs true (0, 1)
ATTR_TGT = t([10, 20], [10, 20], [10, 20])
ATTR_DRAFT = t([10, 21], [10, 20], [11, 20])
ATTR_COR = t([10, 20], [10, 20], [11, 21])
R_SEM_PRED = t([1, 0], [1, 1], [1, 1])
R_LOC_PRED = t(3, 5, 2)  # true: 3, 5, 3


def episode_rewards(cfg):
    return grc_rewards(DRAFT, CORRECTED, TARGET, R_LOC_PRED, R_SEM_PRED, ATTR_DRAFT, ATTR_COR, ATTR_TGT, cfg)


# Hand-worked, default config (beta_cor 2.2, beta_last 2, beta_loc 1, beta_sem 0.8, eps 1e-6):
#   l0 = (2, 4, 2), l1 = (3, 4, 2); task = l0 + 2 l1 = (8, 12, 6)
#   loc_label: (3 = 3, 5 = 5, 2 != 3) = (1, 1, 0)
#   loc_cor:  row 0 1/(2+eps); row 1 E empty -> 0; row 2 E = {2,3,4}, C = {3} -> 1/3
#   sem_label: row 0 2/2 = 1; row 1 1; row 2 (1 vs 0, 1 vs 1) = 1/2
#   sem_cor:  row 0 k=2 flagged 0 and fixed -> 1/2; row 1 0; row 2 nothing flagged -> 0
#   delta = (1, 0, 0)
#   cor = loc + 0.8 sem + delta: row 0 1.5 + 1.2 + 1 = 3.7; row 1 1 + 0.8 = 1.8; row 2 1/3 + 0.4 = 0.7333...
#   total = task + 2.2 cor: 8 + 8.14 = 16.14; 12 + 3.96 = 15.96; 6 + 1.61333 = 7.61333
LOC_COR_0 = 1 / (2 + 1e-6)
FULL = {
    "l0": [2.0, 4.0, 2.0], "l1": [3.0, 4.0, 2.0], "task": [8.0, 12.0, 6.0],
    "loc_label": [1.0, 1.0, 0.0], "loc_cor": [LOC_COR_0, 0.0, 1 / 3], "loc": [1 + LOC_COR_0, 1.0, 1 / 3],
    "sem_label": [1.0, 1.0, 0.5], "sem_cor": [0.5, 0.0, 0.0], "sem": [1.5, 1.0, 0.5],
    "delta": [1.0, 0.0, 0.0], "cor": [3.7, 1.8, 1 / 3 + 0.4], "total": [16.14, 15.96, 6 + 2.2 * (1 / 3 + 0.4)],
}


def test_grc_rewards_by_hand():
    out = episode_rewards(paper_rewards())
    assert set(out) == set(FULL)
    for key, expected in FULL.items():
        close(out[key], expected)


@pytest.mark.parametrize(
    "switch, zeroed, cor, total",
    [
        # w/o R_task: total = 2.2 cor = (8.14, 3.96, 1.61333)
        ("use_task", {"task"}, FULL["cor"], [8.14, 3.96, 2.2 * (1 / 3 + 0.4)]),
        # w/o R_cor: total = task
        ("use_cor", {"loc_label", "loc_cor", "loc", "sem_label", "sem_cor", "sem", "delta", "cor"}, [0.0] * 3,
         [8.0, 12.0, 6.0]),
        # w/o R_loc: cor = 0.8 sem + delta = (2.2, 0.8, 0.4); total = task + 2.2 cor = (12.84, 13.76, 6.88)
        ("use_loc", {"loc_label", "loc_cor", "loc"}, [2.2, 0.8, 0.4], [12.84, 13.76, 6.88]),
        # w/o R_sem: cor = loc + delta = (2.5, 1, 1/3); total = (13.5, 14.2, 6.7333)
        ("use_sem", {"sem_label", "sem_cor", "sem"}, [1 + LOC_COR_0 + 1, 1.0, 1 / 3],
         [8 + 2.2 * (2 + LOC_COR_0), 14.2, 6 + 2.2 / 3]),
        # w/o R_delta: cor = (2.7, 1.8, 0.7333); total = (13.94, 15.96, 7.61333)
        ("use_delta", {"delta"}, [2.7, 1.8, 1 / 3 + 0.4], [13.94, 15.96, 6 + 2.2 * (1 / 3 + 0.4)]),
    ],
)
def test_grc_rewards_ablations(switch, zeroed, cor, total):
    cfg = paper_rewards(**{switch: False})
    out = episode_rewards(cfg)
    for key, expected in FULL.items():
        if key not in ("cor", "total"):
            close(out[key], [0.0] * 3 if key in zeroed else expected)
    close(out["cor"], cor)
    close(out["total"], total)
    # the dict is the reward trained on: its parts always sum to it
    close(out["cor"], (cfg.beta_loc * out["loc"] + cfg.beta_sem * out["sem"] + out["delta"]).tolist())
    close(out["total"], (out["task"] + cfg.beta_cor * out["cor"]).tolist())


def test_grc_rewards_without_attributes():
    # A = 0: R_sem is 0, so cor = loc + delta = (2.5, 1, 1/3)
    empty = torch.zeros(3, 0, dtype=torch.long)
    out = grc_rewards(DRAFT, CORRECTED, TARGET, R_LOC_PRED, empty, empty, empty, empty, paper_rewards())
    close(out["sem"], [0.0, 0.0, 0.0])
    close(out["cor"], [2 + LOC_COR_0, 1.0, 1 / 3])


def test_group_advantages_zscore():
    # groups, in mixed order: 7 -> rewards (1, 2, 3); 3 -> (4, 4); 5 -> (10,) alone
    # group 7: mean 2, population std sqrt(2/3) = 0.816497 -> (-1, 0, 1) / (0.816497 + 1e-6) = -+1.224743
    # group 3: std 0 -> 0 / eps = 0; group 5: singleton -> 0
    rewards = torch.tensor([1.0, 4.0, 2.0, 10.0, 4.0, 3.0])
    group = t(7, 3, 7, 5, 3, 7)
    z = 1 / (2 / 3) ** 0.5
    close(group_advantages(rewards, group), [-z, 0.0, 0.0, 0.0, 0.0, z])


def test_group_advantages_rank():
    # group 0: rewards (5, 1, 5, 3) -> ranks (3.5, 1, 3.5, 2) (the two 5s share ranks 3 and 4)
    #   mean 2.5, deviations (1, -1.5, 1, -0.5), variance (1 + 2.25 + 1 + 0.25) / 4 = 1.125, std 1.0606602
    #   -> (0.942809, -1.414214, 0.942809, -0.471405)
    # group 1: rewards (0, 100, 1) -> ranks (1, 3, 2) -> (-1.224745, 1.224745, 0); zscore mode would give
    #   mean 33.667, std 46.906 -> (-0.7177, 1.4142, -0.6964), so the modes differ
    # group 2: singleton -> 0
    rewards = torch.tensor([5.0, 0.0, 1.0, 5.0, 100.0, 3.0, 1.0, -7.0])
    group = t(0, 1, 0, 0, 1, 0, 1, 2)
    s = 1.125 ** 0.5
    z3 = 1 / (2 / 3) ** 0.5
    close(group_advantages(rewards, group, mode="rank"),
          [1 / s, -z3, -1.5 / s, 1 / s, z3, -0.5 / s, 0.0, 0.0])
    close(group_advantages(rewards, group)[[1, 4, 6]], [-0.7177, 1.4142, -0.6964], tol=1e-4)
    # a monotone transform of the rewards leaves rank advantages unchanged
    close(group_advantages(rewards ** 3 * 2 - 1, group, mode="rank"),
          group_advantages(rewards, group, mode="rank").tolist())
    # all tied -> all 0
    close(group_advantages(torch.tensor([2.0, 2.0, 2.0]), t(4, 4, 4), mode="rank"), [0.0, 0.0, 0.0])


def slow_group_advantages(rewards, group, mode, eps=1e-6):
    out = []
    for i in range(len(rewards)):
        members = [j for j in range(len(rewards)) if group[j] == group[i]]
        vals = [float(rewards[j]) for j in members]
        if mode == "rank":
            vals = [sum(w < v for w in vals) + (sum(w == v for w in vals) + 1) / 2 for v in vals]
        mean = sum(vals) / len(vals)
        std = (sum((v - mean) ** 2 for v in vals) / len(vals)) ** 0.5
        out.append((vals[members.index(i)] - mean) / (std + eps))
    return out


@pytest.mark.parametrize("mode", ["zscore", "rank"])
def test_group_advantages_match_a_slow_loop(mode):
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 4, (60,), generator=gen).double()  # few values: many ties
    group = torch.randint(0, 9, (60,), generator=gen) * 11  # sparse ids, some groups tiny
    expected = slow_group_advantages(rewards.tolist(), group.tolist(), mode)
    close(group_advantages(rewards, group, mode=mode), expected, tol=1e-9)


def test_group_advantages_guards():
    with pytest.raises(ValueError, match="mode"):
        group_advantages(torch.tensor([1.0]), t(0), mode="softmax")
    with pytest.raises(ValueError, match="finite"):
        group_advantages(torch.tensor([1.0, float("nan")]), t(0, 0))
    with pytest.raises(ValueError, match="float"):
        group_advantages(t(1, 2), t(0, 0))
    assert group_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long)).shape == (0,)
