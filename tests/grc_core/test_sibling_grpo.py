import dataclasses
import math

import pytest
import torch

from grc_core.config import SiblingConfig
from grc_core.sibling_grpo import node_rewards, sequence_advantages, sibling_advantages, vstar_loss

# One user, four candidates of a 2-level tree (code, code) and their rewards:
#   c0 (0,0) R=1    c1 (0,1) R=0    c2 (0,2) R=0.5    c3 (1,0) R=0
CODES = torch.tensor([[[0, 0], [0, 1], [0, 2], [1, 0]]])
R = torch.tensor([[1.0, 0.0, 0.5, 0.0]])
LIVE = torch.ones(1, 4, dtype=torch.bool)
EPS = 1e-6


def cfg(eta, eps=EPS):
    return SiblingConfig(sibling_weight=eta, dense_weight=0.0, clip_eps=0.2, kl_beta=0.1, ppo_epochs=1, eps=eps)


def test_node_rewards_by_hand():
    # depth 1: node 0 holds c0, c1, c2 -> (1 + 0 + 0.5) / 3 = 0.5; node 1 holds c3 -> 0
    # depth 2: every candidate is its own node -> its reward
    want = torch.tensor([[[0.5, 1.0], [0.5, 0.0], [0.5, 0.5], [0.0, 0.0]]])
    assert torch.allclose(node_rewards(CODES, R, LIVE), want)


def test_sibling_advantages_by_hand():
    adv, branching = sibling_advantages(CODES, R, LIVE, EPS)
    # depth 1, parent = root, sibling nodes {0: 0.5, 1: 0}: each node once, mu = 0.25 (not the
    # candidate-weighted 0.375), sigma = 0.25 -> +1 for c0, c1, c2 and -1 for c3
    a1 = 0.25 / (0.25 + EPS)
    # depth 2, parent (0): nodes {0: 1, 1: 0, 2: 0.5}, mu = 0.5, sigma = sqrt((0.25 + 0.25 + 0) / 3) = 0.408248
    # -> +1.224745, -1.224745, 0; parent (1) has one node: not a branching token, advantage 0
    s = math.sqrt(0.5 / 3)
    want = torch.tensor([[[a1, 0.5 / (s + EPS)], [a1, -0.5 / (s + EPS)], [a1, 0.0], [-a1, 0.0]]])
    assert torch.allclose(adv, want, atol=1e-6)
    assert branching.tolist() == [[[True, True], [True, True], [True, True], [True, False]]]


def test_sequence_advantages_by_hand_and_padding():
    # mean 0.375; population variance (0.625^2 + 0.375^2 + 0.125^2 + 0.375^2) / 4 = 0.171875
    sd = math.sqrt(0.171875)
    want = torch.tensor([[0.625, -0.375, 0.125, -0.375]]) / (sd + EPS)
    assert torch.allclose(sequence_advantages(R, LIVE, EPS), want, atol=1e-6)
    # a padded candidate neither counts in the group nor gets an advantage
    live = torch.tensor([[True, True, False, False]])
    got = sequence_advantages(R, live, EPS)
    assert got[0, 2:].abs().sum() == 0 and torch.allclose(got[0, :2], torch.tensor([1.0, -1.0]) * 0.5 / (0.5 + EPS))


def test_all_zero_group_gives_no_signal_and_no_nan():
    zero = torch.zeros(1, 4)
    adv, branching = sibling_advantages(CODES, zero, LIVE, EPS)
    seq = sequence_advantages(zero, LIVE, EPS)
    assert adv.abs().sum() == 0 and seq.abs().sum() == 0 and branching.any()
    lp = torch.log(torch.full((4, 2), 0.3, requires_grad=True))
    loss, info = vstar_loss(lp, lp.detach(), lp.detach(), seq.view(4), adv.view(4, 2), branching.view(4, 2),
                            LIVE.view(4), cfg(0.5))
    assert loss.item() == 0.0 and info["kl"] == 0.0 and torch.isfinite(loss)


def test_blended_loss_by_hand():
    adv, branching = sibling_advantages(CODES, R, LIVE, EPS)
    seq = sequence_advantages(R, LIVE, EPS)
    lp = torch.zeros(4, 2)
    # ratio 1, KL 0: the GRPO term is minus the mean advantage over 8 tokens = 0 (z-scores sum to 0);
    # the sibling term is minus the mean over the 7 branching tokens: (3 a1 - a1 + 1.2247 - 1.2247 + 0) / 7
    a1 = 0.25 / (0.25 + EPS)
    for eta in (0.0, 0.5, 1.0):
        loss, info = vstar_loss(lp, lp, lp, seq.view(4), adv.view(4, 2), branching.view(4, 2), LIVE.view(4), cfg(eta))
        assert info["loss_grpo"] == pytest.approx(0.0, abs=1e-6)
        assert info["loss_sibling"] == pytest.approx(-2 * a1 / 7, abs=1e-6)
        assert loss.item() == pytest.approx(eta * -2 * a1 / 7, abs=1e-6)
    # the clip: a token whose ratio is 1.5 under a positive advantage counts as 1.2
    new = lp.clone()
    new[0, 0] = math.log(1.5)
    loss, info = vstar_loss(new, lp, new, seq.view(4), adv.view(4, 2), branching.view(4, 2), LIVE.view(4), cfg(1.0))
    assert info["loss_sibling"] == pytest.approx(-(2 * a1 + 0.2 * a1) / 7, abs=1e-6)


class MemoryCkpt:
    """Checkpoints kept in memory, with the same resume contract as tasks/checkpoints.py."""

    def __init__(self):
        self.saved = {}

    def resume(self, model, opt):
        if "last" not in self.saved:
            return None
        sd, osd, meta = self.saved["last"]
        model.load_state_dict(sd)
        opt.load_state_dict(osd)
        return meta

    def save(self, name, model, opt, meta):
        import copy
        self.saved[name] = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()) if opt else None,
                            copy.deepcopy(meta))

    def load_weights(self, name, model):
        model.load_state_dict(self.saved[name][0])


@pytest.mark.slow  # about 5 s of CPU; far longer in wall time on a shared 2-core box
def test_run_vstar_trains_value_then_policy_and_resumes():
    import copy

    from grc_core.config import ValueConfig, VEDConfig, VStarLoopConfig
    from grc_core.evaluation import history_mask
    from grc_core.sibling_grpo import VStarModules, beam_candidates, run_vstar, ved_candidates
    from grc_core.value import ValueHead
    from tests.grc_core.test_ved import setup

    seq, _, trie, table, inst = setup(3)
    inst = type(inst)(inst.user, inst.history, torch.tensor([3, 5, 7, 9, 11]))
    emb = torch.randn(table.codes.shape[0], 6, generator=torch.Generator().manual_seed(0))
    vcfg = ValueConfig(d_ff=16, n_heads=2, level_weights=(0.3, 0.5, 1.0), gamma=0.99, steps=2, users_per_step=4,
                       samples=4, lr=1e-2)
    ved = VEDConfig(init_beam=2, candidates=4, budget=12, entropy_weight=0.1, ucb_beta=1.0, expand="sample", max_iters=30)
    loop = VStarLoopConfig(iterations=3, users_per_step=4, lr=1e-2, weight_decay=0.0, grad_clip=1.0, eval_every=2, seed=0)
    scfg = SiblingConfig(sibling_weight=0.5, dense_weight=0.5, clip_eps=0.2, kl_beta=0.01, ppo_epochs=2, eps=1e-6)
    excl = lambda h: history_mask(h, table.codes.shape[0])  # noqa: E731
    calls = []

    def validate(policy):
        calls.append(1)
        return {"recall@10": float(len(calls))}  # rises, so every validation is the best

    def run(iterations, ckpt):
        torch.manual_seed(0)
        mods = VStarModules(copy.deepcopy(seq), ValueHead(16, vcfg))
        ref = copy.deepcopy(seq)
        state = run_vstar(mods, ref, inst, table, trie, emb, vcfg, scfg, dataclasses.replace(loop, iterations=iterations),
                          ved_candidates(trie, ved), validate, ckpt, excl)
        return mods, state

    ckpt = MemoryCkpt()
    mods, state = run(3, ckpt)
    phases = [r["phase"] for r in state.history]
    assert phases == ["value", "value", "start", "rl", "rl", "rl"]
    assert all(math.isfinite(r["value_loss"]) for r in state.history if "value_loss" in r)
    assert not torch.equal(mods.policy.heads[0].weight, seq.heads[0].weight)  # the policy moved in RL
    assert state.best_epoch == 3 and "forward_tokens" in state.history[3]
    # a run stopped after 2 RL iterations (its last checkpoint at the validation of iteration 2), then resumed
    ckpt2 = MemoryCkpt()
    run(2, ckpt2)
    resumed, _ = run(3, ckpt2)
    for a, b in zip(resumed.state_dict().values(), mods.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)
    # the control: plain GRPO on beam candidates, no value head
    plain = VStarModules(copy.deepcopy(seq), None)
    st = run_vstar(plain, copy.deepcopy(seq), inst, table, trie, emb, None,
                   SiblingConfig(**{**scfg.__dict__, "sibling_weight": 0.0}), loop, beam_candidates(trie, 4),
                   validate, MemoryCkpt(), excl)
    assert [r["phase"] for r in st.history] == ["start", "rl", "rl", "rl"]


def test_a_padded_candidate_with_minus_inf_logprobs_leaves_the_loss_finite():
    adv, branching = sibling_advantages(CODES, R, LIVE, EPS)
    seq = sequence_advantages(R, LIVE, EPS)
    lp = torch.zeros(4, 2, requires_grad=True)
    bad = torch.where(torch.tensor([[False, False]] * 3 + [[True, True]]), float("-inf"), lp)  # row 3 padded
    live = torch.tensor([True, True, True, False])
    loss, info = vstar_loss(bad, bad.detach(), bad.detach(), seq.view(4), adv.view(4, 2), branching.view(4, 2), live,
                            cfg(0.5))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all() and math.isfinite(info["kl"])
