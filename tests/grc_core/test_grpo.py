import pytest
import torch

from grc_core.data import make_instances
from grc_core.grc import expand_memory
from grc_core.grpo import (GRPOConfig, LoopConfig, episode_logprobs, grpo_loss, run_grpo, sample_episodes,
                           token_advantages)
from grc_core.trie import PrefixTrie
from tasks.checkpoints import Checkpointer
from tests.grc_core.test_grc import LEVELS, tiny_grc
from tests.grc_core.test_model import batch_for, catalog
from tests.grc_core.test_rewards import paper_rewards


def rollout(**changes) -> GRPOConfig:
    """The paper's GRPO settings (params.yaml's grpo.rollout) with `changes`."""
    return GRPOConfig(**{"group_size": 8, "clip_eps": 0.15, "kl_beta": 0.03, "ppo_epochs": 2, "temperature": 1.0,
                         "advantage": "zscore", **changes})


L = len(LEVELS)


def _setup(reflect=True):
    model, table = tiny_grc(num_attrs=1, reflect=reflect), catalog()
    trie = PrefixTrie.from_ids(table.codes.numpy(), LEVELS)
    batch = batch_for(table, [[0, 1, 2], [3], [4, 5]], [8, 9, 10])
    return model, table, trie, batch


@pytest.mark.parametrize("reflect", [True, False])
def test_sampled_episodes_are_valid_and_their_logprobs_match_teacher_forcing(reflect):
    model, table, trie, batch = _setup(reflect)
    cfg = rollout(group_size=5)
    exclude = torch.zeros(3, table.codes.shape[0], dtype=torch.bool)
    exclude[:, [0, 1, 2, 3]] = True
    ep = sample_episodes(model, batch, trie, cfg, torch.Generator().manual_seed(0), exclude)
    n_slots = 2 if reflect else 0
    assert ep.draft.shape == (15, L) and ep.corrected.shape == (15, L) and ep.logp.shape == (15, 2 * L + n_slots)
    ids = {tuple(r) for r in table.codes.tolist()}
    for z, item in [(ep.draft, ep.draft_items), (ep.corrected, ep.corrected_items)]:
        assert all(tuple(r) in ids for r in z.tolist())  # every sample is a real item
        assert torch.equal(table.codes[item], z)
        assert not exclude[0, item].any()  # excluded items are never sampled
    if reflect:
        assert ((ep.reflection[:, 0] >= 1) & (ep.reflection[:, 0] <= L + 1)).all()
    memory = expand_memory(model.seq.encode(batch), 5)
    with torch.no_grad():
        lp, ent = episode_logprobs(model, memory, ep, trie, exclude=exclude.repeat_interleave(5, 0))
    torch.testing.assert_close(lp, ep.logp, atol=1e-5, rtol=0)  # ratio 1 at the first step
    assert (ent >= -1e-6).all()


def test_sampling_is_seeded():
    model, table, trie, batch = _setup()
    a = sample_episodes(model, batch, trie, rollout(group_size=4), torch.Generator().manual_seed(1))
    b = sample_episodes(model, batch, trie, rollout(group_size=4), torch.Generator().manual_seed(1))
    c = sample_episodes(model, batch, trie, rollout(group_size=4), torch.Generator().manual_seed(2))
    assert torch.equal(a.draft, b.draft) and torch.equal(a.corrected, b.corrected)
    assert not (torch.equal(a.draft, c.draft) and torch.equal(a.corrected, c.corrected))


def test_grpo_loss_by_hand():
    cfg = rollout(clip_eps=0.2, kl_beta=0.5)
    old = torch.zeros(2, 2)
    new = torch.log(torch.tensor([[1.5, 1.0], [0.5, 1.0]]))  # ratios 1.5, 1, 0.5, 1
    ref = new.clone()  # KL 0
    adv = torch.tensor([1.0, -1.0])
    loss, info = grpo_loss(new, old, ref, adv, cfg)
    # episode 0 (A=1): min(1.5, 1.2) = 1.2 and 1 -> mean 1.1; episode 1 (A=-1): min(-0.5, -0.8) = -0.8 and -1 -> -0.9
    assert float(loss) == pytest.approx(-(1.1 - 0.9) / 2)
    assert info["clip_frac"] == pytest.approx(0.5) and info["kl"] == pytest.approx(0.0, abs=1e-7)
    ref2 = new + torch.log(torch.tensor(2.0))  # d = log 2: k3 = 2 - log 2 - 1
    loss2, info2 = grpo_loss(new, old, ref2, adv, cfg)
    k3 = 2 - torch.log(torch.tensor(2.0)).item() - 1
    assert info2["kl"] == pytest.approx(k3, rel=1e-5)
    assert float(loss2) == pytest.approx(float(loss) + 0.5 * k3, rel=1e-5)


def test_a_grpo_step_moves_the_policy_towards_the_advantaged_episodes():
    model, table, trie, batch = _setup()
    cfg = rollout(group_size=6, kl_beta=0.0)
    ep = sample_episodes(model, batch, trie, cfg, torch.Generator().manual_seed(3))
    adv = torch.randn(18, generator=torch.Generator().manual_seed(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    memory = expand_memory(model.seq.encode(batch), 6)
    lp0, _ = episode_logprobs(model, memory, ep, trie)
    loss, _ = grpo_loss(lp0, ep.logp, lp0.detach(), adv, cfg)
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        lp1, _ = episode_logprobs(model, expand_memory(model.seq.encode(batch), 6), ep, trie)
    gain = ((lp1 - lp0.detach()).sum(1) * adv).sum()
    assert gain > 0  # log-probs rose where the advantage is positive, on balance


def test_per_token_advantages_equal_to_the_episode_broadcast_give_the_same_loss():
    cfg = rollout(clip_eps=0.2, kl_beta=0.1)
    gen = torch.Generator().manual_seed(0)
    new, old, ref = (torch.randn(4, 5, generator=gen) * 0.3 for _ in range(3))
    adv = torch.tensor([1.0, -0.5, 0.0, 2.0])
    a, _ = grpo_loss(new, old, ref, adv, cfg)
    b, _ = grpo_loss(new, old, ref, adv[:, None].expand(4, 5), cfg)
    assert float(a) == pytest.approx(float(b), rel=1e-6)


def test_task_credit_gives_the_draft_tokens_r_task_advantage_and_the_rest_r():
    # Two users x two episodes. Group 0: totals 1, 3 (z-scores -1, +1), tasks 2, 0 (+1, -1);
    # group 1: totals equal (0, 0), tasks 1, 3 (-1, +1). L = 2 draft tokens of T = 5.
    rewards = {"total": torch.tensor([1.0, 3.0, 5.0, 5.0]), "task": torch.tensor([2.0, 0.0, 1.0, 3.0])}
    groups = torch.tensor([0, 0, 1, 1])
    episode = token_advantages(rewards, groups, 2, 5, "zscore", "episode")
    assert episode.shape == (4,) and episode.tolist() == pytest.approx([-1, 1, 0, 0], abs=1e-5)
    task = token_advantages(rewards, groups, 2, 5, "zscore", "task")
    want = [[1, 1, -1, -1, -1], [-1, -1, 1, 1, 1], [-1, -1, 0, 0, 0], [1, 1, 0, 0, 0]]
    for row, expect in zip(task.tolist(), want):
        assert row == pytest.approx(expect, abs=1e-5)
    with pytest.raises(ValueError, match="draft_advantage"):
        LoopConfig(1, 1, 1e-3, 0.0, 1.0, 1, 0, "draft")


def _run(tmp_path, iterations, draft_advantage="episode"):
    model, table, trie, _ = _setup()
    ref = tiny_grc(num_attrs=1, reflect=True)
    ref.load_state_dict(model.state_dict())
    train = make_instances([0, 1, 2, 3], [[0, 1, 2], [3], [4, 5], [6, 7]], [8, 9, 10, 11], 4)
    loop = LoopConfig(iterations, 2, 1e-2, 0.0, 1.0, 2, 7, draft_advantage)
    calls = []

    def validate(m):
        calls.append(1)
        return {"recall@10": float(len(calls) % 2)}  # alternates, so "best" moves

    state = run_grpo(model, ref, train, table, trie, rollout(group_size=3), paper_rewards(), loop, validate,
                     Checkpointer(tmp_path / "ckpt", "fp"))
    return model, state


@pytest.mark.parametrize("draft_advantage", ["episode", "task"])
def test_run_grpo_resumes_to_the_same_weights(tmp_path, draft_advantage):
    whole, s_whole = _run(tmp_path / "a", 4, draft_advantage)
    _run(tmp_path / "b", 2, draft_advantage)  # stops at iteration 2 (a checkpoint) ...
    resumed, s_resumed = _run(tmp_path / "b", 4, draft_advantage)  # ... and the same call with 4 resumes
    assert s_resumed.step == 4 and len(s_resumed.history) == len(s_whole.history) == 5
    for k, v in whole.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert (tmp_path / "a" / "ckpt" / "best" / "model.safetensors").exists()
