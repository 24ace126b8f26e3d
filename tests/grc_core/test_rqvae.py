import dataclasses
import math

import numpy as np
import pytest
import torch

from grc_core.rqvae import (
    RQVAE,
    RQVAEConfig,
    RQVAEOutput,
    code_perplexity,
    code_utilisation,
    encode_codes,
    reconstruction_error,
    rotation_trick,
    rqvae_loss,
    straight_through,
    train_rqvae,
)

TINY = RQVAEConfig(
    num_levels=2,
    codebook_size=4,
    latent_dim=4,
    hidden_dims=(16,),
    epochs=30,
    batch_size=32,
    lr=1e-2,
    weight_decay=1e-4,
    commitment_beta=0.25,
    kmeans_init=True,
    kmeans_iters=10,
    dead_code_restart=True,
    gradient="ste",
    seed=0,
    device="cpu",
    normalize_latent=True,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core box a second thread's
    spin-waits turn a 0.2 s training run into seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def four_clusters(per: int = 30, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around +-e_0, +-e_1 (noise 0.05 per coordinate)."""
    rng = np.random.default_rng(seed)
    centres = np.zeros((4, dim))
    centres[0, 0], centres[1, 0], centres[2, 1], centres[3, 1] = 1.0, -1.0, 1.0, -1.0
    label = np.repeat(np.arange(4), per)
    x = centres[label] + 0.05 * rng.normal(size=(4 * per, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), label


def blob(n: int = 200, dim: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="gradient must be 'ste' or 'rotation'"):
        dataclasses.replace(TINY, gradient="gumbel")
    with pytest.raises(ValueError, match="codebook_size must be >= 2"):
        dataclasses.replace(TINY, codebook_size=1)


def test_rqvae_loss_by_hand():
    x = torch.tensor([[1.0, 0.0]])
    residuals = torch.tensor([[[1.0], [0.5]]], requires_grad=True)  # (B=1, L=2, d=1)
    quantised = torch.tensor([[[0.5], [0.25]]], requires_grad=True)
    out = RQVAEOutput(torch.zeros(1, 2), residuals[:, 0], residuals, quantised, torch.zeros(1, 2, dtype=torch.long))
    terms = rqvae_loss(x, out, beta=0.25)
    # recon ||(1,0)-(0,0)||^2 = 1; codebook = commitment = 0.5^2 + 0.25^2 = 0.3125;
    # total = 1 + 0.3125 + 0.25 * 0.3125 = 1.390625.
    assert terms.recon.item() == pytest.approx(1.0)
    assert terms.codebook.item() == pytest.approx(0.3125)
    assert terms.commitment.item() == pytest.approx(0.3125)
    assert terms.total.item() == pytest.approx(1.390625)
    terms.total.backward()
    # Codebook term moves e only: 2 (e - r) = (-1, -0.5); commitment moves r only: 0.25 * 2 (r - e).
    torch.testing.assert_close(quantised.grad.flatten(), torch.tensor([-1.0, -0.5]))
    torch.testing.assert_close(residuals.grad.flatten(), torch.tensor([0.25, 0.125]))


def test_straight_through_passes_the_gradient_unchanged():
    z = torch.tensor([[1.0, 2.0]], requires_grad=True)
    out = straight_through(z, torch.tensor([[3.0, -1.0]]))
    out[0, 0].backward()
    torch.testing.assert_close(out.detach(), torch.tensor([[3.0, -1.0]]))
    torch.testing.assert_close(z.grad, torch.tensor([[1.0, 0.0]]))


def test_rotation_trick_by_hand():
    z = torch.tensor([[1.0, 0.0]], requires_grad=True)
    z_hat = torch.tensor([[0.0, 2.0]])
    out = rotation_trick(z, z_hat)
    # u = (1,0), v = (0,1): R = I - 2ww^T + 2vu^T = [[0,-1],[1,0]] (a quarter turn), lambda = 2.
    # out_0 = 2 (R z)_0 = -2 z_1, so d out_0 / dz = (0, -2).
    torch.testing.assert_close(out.detach(), z_hat)
    out[0, 0].backward()
    torch.testing.assert_close(z.grad, torch.tensor([[0.0, -2.0]]))


def test_rotation_trick_is_the_identity_when_z_is_its_own_code():
    z = torch.tensor([[0.6, 0.8]], requires_grad=True)
    out = rotation_trick(z, z.detach().clone())
    out[0, 1].backward()
    torch.testing.assert_close(z.grad, torch.tensor([[0.0, 1.0]]))


def identity_model() -> RQVAE:
    """Encoder = identity on R^2 (no hidden layer), codebooks set by hand."""
    cfg = dataclasses.replace(TINY, latent_dim=2, hidden_dims=(), codebook_size=2, normalize_latent=False)
    model = RQVAE(2, cfg)
    with torch.no_grad():
        model.encoder[0].weight.copy_(torch.eye(2))
        model.encoder[0].bias.zero_()
        model.codebooks.copy_(torch.tensor([[[0.0, 0.0], [10.0, 0.0]], [[0.0, 1.0], [0.0, -1.0]]]))
    return model


def test_encode_codes_by_hand():
    enc = encode_codes(identity_model(), np.array([[9.0, 2.0], [1.0, -3.0]], dtype=np.float32))
    # (9,2): level 1 -> (10,0) (dist 5 < 85), residual (-1,2); level 2 -> (0,1) (dist 2 < 10), left (-1,1).
    # (1,-3): level 1 -> (0,0) (10 < 90), residual (1,-3); level 2 -> (0,-1) (5 < 17), left (1,-2).
    np.testing.assert_array_equal(enc.codes, [[1, 0], [0, 1]])
    np.testing.assert_allclose(enc.last_level_distances, [[2.0, 10.0], [17.0, 5.0]])
    np.testing.assert_allclose(enc.final_residuals, [[-1.0, 1.0], [1.0, -2.0]])
    assert enc.codes.dtype == np.int64


def test_reconstruction_error_by_hand():
    model = identity_model()
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.zero_()
    # The decoder outputs 0, so the error is mean(x^2) = (1 + 0 + 0 + 1) / 4.
    assert reconstruction_error(model, np.eye(2, dtype=np.float32)) == pytest.approx(0.5)


def test_code_utilisation_and_perplexity_by_hand():
    codes = np.array([[0, 1], [0, 1], [1, 1], [3, 1]])
    # Level 1 uses {0, 1, 3} of 4 codes; level 2 only code 1.
    assert code_utilisation(codes, 4) == [0.75, 0.25]
    # Level 1: p = (1/2, 1/4, 0, 1/4), H = 1/2 ln 2 + 2 * 1/4 ln 4 = 1.5 ln 2, exp(H) = 2^1.5.
    ppl = code_perplexity(codes, 4)
    assert ppl[0] == pytest.approx(2**1.5) and ppl[1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 2\)"):
        code_utilisation(codes, 2)


@pytest.mark.parametrize("gradient", ["ste", "rotation"])
def test_level_one_codes_split_separated_clusters(gradient):
    x, label = four_clusters()
    res = train_rqvae(x, dataclasses.replace(TINY, gradient=gradient))
    first = res.codes[:, 0]
    per_cluster = [np.unique(first[label == c]) for c in range(4)]
    assert all(len(u) == 1 for u in per_cluster)
    assert len({int(u[0]) for u in per_cluster}) == 4
    assert res.codes.shape == (120, 2) and res.codes.dtype == np.int64


def test_dead_code_restart_repairs_a_collapsed_codebook():
    x = blob()
    cfg = dataclasses.replace(TINY, codebook_size=16, epochs=6, kmeans_init=False)
    utilisation = {}
    for restart in (False, True):
        torch.manual_seed(0)
        model = RQVAE(x.shape[1], cfg)
        with torch.no_grad():
            # All 16 level-1 codes at one point, 3 units from every (unit-norm) latent.
            model.codebooks[0] = torch.full((4,), 1.5)
        before = code_utilisation(encode_codes(model, x).codes, 16)[0]
        assert before == 1 / 16  # detected: every item takes code 0 (ties go to the lowest index)
        res = train_rqvae(x, dataclasses.replace(cfg, dead_code_restart=restart), model=model)
        utilisation[restart] = code_utilisation(res.codes, 16)[0]
    # Without restarts code 0 moves toward the latents and the 15 stale copies stay out of reach.
    assert utilisation[False] == 1 / 16
    assert utilisation[True] >= 0.75


def test_training_is_deterministic_given_a_seed():
    x = blob(120)
    cfg = dataclasses.replace(TINY, codebook_size=8, epochs=4, batch_size=32, gradient="rotation")
    a, b = train_rqvae(x, cfg), train_rqvae(x, cfg)
    np.testing.assert_array_equal(a.codes, b.codes)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


def test_history_progress_and_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    x = blob(60)
    seen = []
    res = train_rqvae(x, dataclasses.replace(TINY, epochs=3), progress=lambda e, r: seen.append((e, r)))
    assert [e for e, _ in seen] == [0, 1, 2]
    assert [r for _, r in seen] == res.history
    last = res.history[-1]
    assert len(last["utilisation"]) == 2 and last["restarted"] == [0, 0]  # no restart after the last epoch
    assert math.isfinite(last["loss"]) and last["loss"] >= last["recon"]
    save_file(res.state_dict(), tmp_path / "rqvae.safetensors")
    loaded = load_file(tmp_path / "rqvae.safetensors")
    assert loaded.keys() == res.state_dict().keys()
    fresh = RQVAE(x.shape[1], TINY)
    fresh.load_state_dict(loaded)
    np.testing.assert_array_equal(encode_codes(fresh, x).codes, res.codes)


def test_train_rqvae_guards_its_inputs():
    with pytest.raises(ValueError, match="3 items cannot fill codebooks of size 4"):
        train_rqvae(blob(3), TINY)
    bad = blob(10)
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        train_rqvae(bad, TINY)
    with pytest.raises(ValueError, match=r"\(N, D_in\)"):
        train_rqvae(np.zeros(10, dtype=np.float32), TINY)
    other = RQVAE(8, dataclasses.replace(TINY, codebook_size=8))
    with pytest.raises(ValueError, match="model was built with codebook_size=8, cfg has 4"):
        train_rqvae(blob(10), TINY, model=other)
