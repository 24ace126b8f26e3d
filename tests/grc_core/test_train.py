import json
import math

import pytest
import torch
from torch import nn

from grc_core.train import TrainConfig, epoch_batches, fit, lr_at
from tasks.checkpoints import Checkpointer

CFG = TrainConfig(epochs=3, batch_size=4, lr=0.1, weight_decay=0.0, warmup_steps=2, min_lr_ratio=0.1,
                  grad_clip=1.0, eval_every=1, patience=0, seed=7, device="cpu", threads=0)

X = torch.linspace(-1, 1, 10)[:, None]
Y = 3 * X + 1


def loss_fn(model, idx):
    return ((model(X[idx]) - Y[idx]) ** 2).mean()


def evaluate(model):
    with torch.no_grad():
        return {"recall@10": -float(((model(X) - Y) ** 2).mean())}


def fresh():
    torch.manual_seed(0)
    return nn.Linear(1, 1)


def test_lr_schedule_by_hand():
    # warm-up: step 0 -> 0.1 * 1/2, step 1 -> 0.1; then cosine from 0.1 down to 0.01 over 8 steps
    assert lr_at(0, 10, CFG) == pytest.approx(0.05)
    assert lr_at(1, 10, CFG) == pytest.approx(0.1)
    assert lr_at(2, 10, CFG) == pytest.approx(0.1)
    # halfway (step 6 = 2 + 4 of 8): 0.01 + 0.09 * 0.5 * (1 + cos(pi/2)) = 0.055
    assert lr_at(6, 10, CFG) == pytest.approx(0.055)
    assert lr_at(10, 10, CFG) == pytest.approx(0.01)


def test_epoch_batches_cover_every_index_once_and_split_across_ranks():
    full = torch.cat(epoch_batches(10, 3, seed=1, epoch=0))
    assert sorted(full.tolist()) == list(range(10))
    r0 = torch.cat(epoch_batches(10, 3, seed=1, epoch=0, rank=0, world=2))
    r1 = torch.cat(epoch_batches(10, 3, seed=1, epoch=0, rank=1, world=2))
    assert sorted(r0.tolist() + r1.tolist()) == list(range(10))
    assert not torch.equal(full, torch.cat(epoch_batches(10, 3, seed=1, epoch=1)))


def test_fit_is_deterministic_and_learns(tmp_path):
    a, b = fresh(), fresh()
    sa = fit(a, 10, loss_fn, evaluate, CFG, Checkpointer(tmp_path / "a", ""))
    fit(b, 10, loss_fn, evaluate, CFG, Checkpointer(tmp_path / "b", ""))
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert sa.history[-1]["train_loss"] < sa.history[0]["train_loss"]
    assert (tmp_path / "a" / "best" / "model.safetensors").exists()


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_to_identical_weights(tmp_path):
    ref = fresh()
    fit(ref, 10, loss_fn, evaluate, CFG, Checkpointer(tmp_path / "ref", ""))
    calls = {"n": 0}

    def flaky(model, idx):
        calls["n"] += 1
        if calls["n"] == 5:  # in the middle of epoch 2 (3 steps per epoch)
            raise Interrupt
        return loss_fn(model, idx)

    model = fresh()
    with pytest.raises(Interrupt):
        fit(model, 10, flaky, evaluate, CFG, Checkpointer(tmp_path / "run", ""))
    state = json.loads((tmp_path / "run" / "last" / "trainer.json").read_text())["state"]
    assert state["epoch"] == 1
    resumed = nn.Linear(1, 1)  # different init: the weights must come from the checkpoint
    out = fit(resumed, 10, loss_fn, evaluate, CFG, Checkpointer(tmp_path / "run", ""))
    assert out.epoch == 3 and len(out.history) == 3
    assert torch.equal(resumed.weight, ref.weight) and torch.equal(resumed.bias, ref.bias)


def test_ema_is_the_bias_corrected_average_that_validation_and_best_see(tmp_path):
    """At ema_decay d, validation and `best` hold sum_s d^(t-s) (1-d) w_s / (1 - d^t) over the weights
    w_1..w_t after each step, computed here by hand; training and `last` keep the raw weights."""
    d = 0.6
    cfg = TrainConfig(**{**CFG.__dict__, "ema_decay": d})
    model, after_step, seen = fresh(), [], []

    def record_loss(m, idx):
        after_step.append(torch.cat([model.weight.detach().flatten(), model.bias.detach()]).clone())
        return loss_fn(m, idx)

    def score(m):  # improves every epoch, so `best` is the last validation's weights
        seen.append(torch.cat([m.weight.detach().flatten(), m.bias.detach()]).clone())
        return {"recall@10": float(len(seen))}

    fit(model, 10, record_loss, score, cfg, Checkpointer(tmp_path / "e", ""))
    raw = torch.cat([model.weight.detach().flatten(), model.bias.detach()])
    steps = after_step[1:] + [raw]  # the weights after steps 1..t (each loss call sees the previous step's)
    t = len(steps)
    expected = sum(d ** (t - s) * (1 - d) * w for s, w in enumerate(steps, start=1)) / (1 - d ** t)
    assert torch.allclose(seen[-1], expected, atol=1e-6)
    assert not torch.allclose(seen[-1], raw, atol=1e-3)  # the average is not the raw weights
    best, last = Checkpointer(tmp_path / "e", ""), fresh()
    best.load_weights("best", last)
    assert torch.allclose(torch.cat([last.weight.flatten(), last.bias]), expected, atol=1e-6)
    best.load_weights("last", last)
    assert torch.equal(torch.cat([last.weight.flatten(), last.bias]), raw)


def test_ema_run_resumed_after_an_interruption_keeps_the_same_average(tmp_path):
    cfg = TrainConfig(**{**CFG.__dict__, "ema_decay": 0.6})
    ref = fresh()
    fit(ref, 10, loss_fn, evaluate, cfg, Checkpointer(tmp_path / "ref", ""))
    calls = {"n": 0}

    def flaky(model, idx):
        calls["n"] += 1
        if calls["n"] == 5:
            raise Interrupt
        return loss_fn(model, idx)

    with pytest.raises(Interrupt):
        fit(fresh(), 10, flaky, evaluate, cfg, Checkpointer(tmp_path / "run", ""))
    resumed = nn.Linear(1, 1)
    fit(resumed, 10, loss_fn, evaluate, cfg, Checkpointer(tmp_path / "run", ""))
    a, b = fresh(), fresh()
    Checkpointer(tmp_path / "ref", "").load_weights("best", a)
    Checkpointer(tmp_path / "run", "").load_weights("best", b)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert torch.equal(resumed.weight, ref.weight)


def test_ema_decay_out_of_range_is_refused():
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(**{**CFG.__dict__, "ema_decay": 1.0})


def test_checkpoint_of_another_config_is_not_resumed(tmp_path):
    fit(fresh(), 10, loss_fn, evaluate, CFG, Checkpointer(tmp_path / "c", "one"))
    out = fit(fresh(), 10, loss_fn, evaluate, CFG, Checkpointer(tmp_path / "c", "two"))
    assert len(out.history) == 3 and out.history[0]["epoch"] == 1


def test_patience_stops_early(tmp_path):
    cfg = TrainConfig(**{**CFG.__dict__, "epochs": 10, "patience": 2})
    out = fit(fresh(), 10, loss_fn, lambda m: {"recall@10": 0.0}, cfg, Checkpointer(tmp_path / "p", ""))
    # first eval sets best (0 > -inf), the next two do not improve -> stop after 3 epochs
    assert out.epoch == 3 and math.isclose(out.best_metric, 0.0)


def seq2seq_setup(seed: int, users: int, epochs: int):
    """A tiny catalog, its trie, random histories and targets of `users` users, and a train config."""
    from grc_core.data import make_instances
    from grc_core.trie import PrefixTrie
    from tests.grc_core.test_model import LEVELS, catalog

    table = catalog()
    trie = PrefixTrie.from_ids(table.codes.numpy(), LEVELS)
    gen = torch.Generator().manual_seed(seed)
    n = len(table.codes)
    histories = [torch.randint(0, n, (4,), generator=gen).tolist() for _ in range(users)]
    targets = torch.randint(0, n, (users,), generator=gen).tolist()
    train = make_instances(range(users), histories, targets, max_len=6)
    cfg = TrainConfig(epochs=epochs, batch_size=8, lr=0.01, weight_decay=0.0, warmup_steps=1, min_lr_ratio=0.1,
                      grad_clip=1.0, eval_every=1, patience=0, seed=7, device="cpu", threads=0)
    return table, trie, histories, targets, train, cfg


def test_fit_seq2seq_distils_the_teacher_next_code_distribution(tmp_path):
    """A teacher whose mass sits on the target alone is the one-hot label (same weights as no
    teacher); a teacher spread over the catalog moves the level-1 distribution towards its own."""
    from grc_core.train import fit_seq2seq
    from tests.grc_core.test_model import LEVELS, batch_for, tiny

    table, trie, histories, targets, train, cfg = seq2seq_setup(3, 32, 2)
    n = len(table.codes)
    spread = torch.full((n,), -math.log(n))  # the uniform catalog

    def run(name, teacher, weight):
        model = tiny()
        fit_seq2seq(model, train, train, table, trie, cfg, Checkpointer(tmp_path / name, name), 20, 16, False,
                    teacher=teacher, distill_weight=weight)
        return model

    plain = run("plain", None, 0.0)
    on_target = run("on_target", lambda inst: torch.where(
        torch.arange(n)[None, :] == inst.target[:, None], 0.0, float("-inf")), 0.5)
    uniform = run("uniform", lambda inst: spread.expand(len(inst), n), 1.0)
    for a, b in zip(plain.parameters(), on_target.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    marginal = torch.bincount(table.codes[:, 0], minlength=LEVELS[0]).float() / n  # the uniform teacher's q_1
    batch = batch_for(table, histories, targets)

    def level1(model):
        with torch.no_grad():
            return torch.softmax(model.eval()(batch)[0], -1).mean(0)
    assert (level1(uniform) - marginal).abs().sum() < (level1(plain) - marginal).abs().sum()


def test_fit_seq2seq_with_a_prior_learns_the_residual(tmp_path):
    """With the teacher's log q_l added to the logits, the backbone learns what the teacher does not
    say. A teacher that puts ten times the mass on the items of first code 0 makes q_1 favour code
    0; the residual model's own level-1 distribution then gives code 0 far less than the plain
    model's, and its product with q_1 is what fits the targets' first codes."""
    from grc_core.train import fit_seq2seq
    from tests.grc_core.test_model import LEVELS, batch_for, tiny

    table, trie, histories, targets, train, cfg = seq2seq_setup(4, 64, 3)
    n = len(table.codes)
    favour = torch.log_softmax(torch.where(table.codes[:, 0] == 0, math.log(10.0), 0.0), -1)  # (N,)
    teacher = lambda inst: favour.expand(len(inst), n)  # noqa: E731

    def run(name, **kw):
        model = tiny()
        fit_seq2seq(model, train, train, table, trie, cfg, Checkpointer(tmp_path / name, name), 20, 16, False, **kw)
        return model

    plain, residual = run("plain"), run("residual", teacher=teacher, prior_weight=1.0)
    q1 = torch.zeros(LEVELS[0]).index_add_(0, table.codes[:, 0], favour.exp())  # the teacher's q_1
    empirical = torch.bincount(table.codes[torch.tensor(targets), 0], minlength=LEVELS[0]).float() / len(targets)
    batch = batch_for(table, histories, targets)

    def level1(model):
        with torch.no_grad():
            return torch.softmax(model.eval()(batch)[0], -1).mean(0)
    assert q1[0] > 0.75 and level1(residual)[0] < 0.5 * level1(plain)[0]
    product = torch.softmax(torch.log(level1(residual)) + q1.log(), -1)
    assert (product - empirical).abs().sum() < (level1(residual) - empirical).abs().sum()
    # no teacher: the plain loss whatever the weight (mine's fold backbones train so)
    same = run("no_teacher", prior_weight=1.0)
    for a, b in zip(plain.parameters(), same.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="set one"):
        run("both", teacher=teacher, prior_weight=1.0, distill_weight=0.5)


def test_fit_seq2seq_trains_a_dense_head_on_the_target_item(tmp_path):
    """The dense head's cross-entropy on the target item falls with training at dense_weight 1; a
    dense weight without a head, or a head without a weight, is refused."""
    import torch.nn.functional as F

    from grc_core.train import fit_seq2seq
    from tests.grc_core.test_model import batch_for, tiny

    from grc_core.data import make_instances

    table, trie, histories, _, _, cfg = seq2seq_setup(5, 64, 8)
    targets = [(h[-1] * 7 + 3) % len(table.codes) for h in histories]  # learnable from the last item
    train = make_instances(range(len(histories)), histories, targets, max_len=6)
    batch = batch_for(table, histories, targets)

    def dense_nll(model):
        with torch.no_grad():
            return F.cross_entropy(model.eval()(batch, dense=True)[1], torch.tensor(targets)).item()

    model = tiny(dense_head=True)
    before = dense_nll(model)
    fit_seq2seq(model, train, train, table, trie, cfg, Checkpointer(tmp_path / "dense", "dense"), 20, 16, False,
                dense_weight=1.0)
    assert dense_nll(model) < 0.85 * before  # untrained: log 25; a head without the loss would not move
    with pytest.raises(ValueError, match="needs a model with a dense head"):
        fit_seq2seq(tiny(), train, train, table, trie, cfg, Checkpointer(tmp_path / "a", "a"), 20, 16, False,
                    dense_weight=1.0)
    with pytest.raises(ValueError, match="needs a model with a dense head"):
        fit_seq2seq(tiny(dense_head=True), train, train, table, trie, cfg, Checkpointer(tmp_path / "b", "b"), 20,
                    16, False)
