"""RQ-VAE item tokenizer (TIGER, Rajput et al. 2023, Sec. 3.1; GRC paper Sec. 5.1).

An MLP encoder maps an item's text embedding x (D_in) to a latent z (d); L residual
codebooks C_1..C_L of K codes quantise it greedily, r_1 = z, c_l = argmin_k ||r_l - C_l[k]||,
r_{l+1} = r_l - C_l[c_l]; an MLP decoder mirrors the encoder and reconstructs x from
z_hat = sum_l C_l[c_l]. The item's semantic ID is (c_1, ..., c_L).

    loss = ||x - x_hat||^2 + sum_l ( ||sg[r_l] - e_l||^2 + beta ||r_l - sg[e_l]||^2 )   (TIGER Eq. 1)

Gradient through the quantiser: straight-through (`ste`, z + sg[z_hat - z]) or the rotation
trick (`rotation`, Fifty et al. 2024, Eq. 4: z_hat's gradient is carried to z by the
rotation-and-rescale that maps z onto z_hat, treated as a constant).

Deviations and choices:
- Squared errors are squared L2 norms averaged over the items of a batch, as Eq. 1 is
  written. Per-coordinate means (F.mse_loss, as in LC-Rec's RQ-VAE) shrink the recon term
  by 1/D_in against the latent terms, and the encoder then collapses toward the codebook
  (recon stuck at ||x||^2/D_in on unit-norm embeddings). `reconstruction_error` is still
  the per-coordinate MSE.
- r_{l+1} = r_l - sg[e_l], so r_l = z - sg[sum_{j<l} e_j] and the level-l commitment pulls z
  toward the partial reconstruction, as in RQ-VAE (Lee et al. 2022, Eq. 7).
- The rotation trick is applied once, to the whole latent (z -> z_hat), not per level; per
  level the Jacobians would add up to a gradient ~L times larger than STE's.
- The encoder output is L2-normalised when `normalize_latent` (an added field), so the
  latent cannot drift in scale and the codebook distances stay comparable across training.
- Codebooks are initialised by k-means (`kmeans_iters` Lloyd steps, k-means++ seeds) on the
  level residuals of the whole catalog (not of the first batch), level by level. These are
  the untrained encoder's latents, which move a lot in the first epoch: on Scientific only
  ~15% of the level-1 codes are still used after it, and the restarts below do the rest.
- Dead-code restart: after every epoch except the last, each code that no item chose during
  that epoch is set to the current level-l residual of a randomly drawn item (TIGER does not
  describe one; SoundStream-style restarts). Skipped after the last epoch so the reported
  history matches the final codebooks.
- AdamW decays the MLP weights only; codebooks are not pulled toward 0.
- N < K is refused: a level cannot use more codes than there are items.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from grc_core.config import RQVAEConfig
from grc_core.device import resolve_device

from grc_core.kmeans import kmeans, make_generator, residual_quantise, squared_distances

_ENCODE_CHUNK = 16384




def mlp(dims: list[int]) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class RQVAEOutput(NamedTuple):
    x_hat: torch.Tensor  # (B, D_in)
    z: torch.Tensor  # (B, d) encoder output
    residuals: torch.Tensor  # (B, L, d) r_l, differentiable w.r.t. z
    quantised: torch.Tensor  # (B, L, d) e_l = C_l[c_l], differentiable w.r.t. the codebooks
    codes: torch.Tensor  # (B, L) int64


class RQVAELoss(NamedTuple):
    total: torch.Tensor
    recon: torch.Tensor
    codebook: torch.Tensor  # summed over levels
    commitment: torch.Tensor  # summed over levels, before beta


def straight_through(z: torch.Tensor, z_hat: torch.Tensor) -> torch.Tensor:
    """Value z_hat, gradient identity to z (van den Oord et al. 2017)."""
    return z + (z_hat - z).detach()


def rotation_trick(z: torch.Tensor, z_hat: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Value z_hat, gradient to z through sg[lambda R] (Fifty et al. 2024, Eq. 4).

    R = I - 2 w w^T + 2 v u^T rotates u = z/||z|| onto v = z_hat/||z_hat|| (w = (u+v)/||u+v||)
    and lambda = ||z_hat|| / ||z|| rescales; both are constants for autograd.
    """
    z_norm = z.norm(dim=1, keepdim=True).clamp_min(eps)  # (B, 1)
    q_norm = z_hat.norm(dim=1, keepdim=True)  # (B, 1)
    u = (z / z_norm).detach()
    v = (z_hat / q_norm.clamp_min(eps)).detach()
    w = F.normalize(u + v, dim=1, eps=eps).detach()
    rotated = z - 2 * w * (w * z).sum(1, keepdim=True) + 2 * v * (u * z).sum(1, keepdim=True)
    out = (q_norm / z_norm).detach() * rotated  # (B, d)
    # Forward value exactly z_hat (R u = v holds only up to rounding).
    return out + (z_hat - out).detach()


class RQVAE(nn.Module):
    def __init__(self, input_dim: int, cfg: RQVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = mlp([input_dim, *cfg.hidden_dims, cfg.latent_dim])
        self.decoder = mlp([cfg.latent_dim, *reversed(cfg.hidden_dims), input_dim])
        book = torch.randn(cfg.num_levels, cfg.codebook_size, cfg.latent_dim) / math.sqrt(cfg.latent_dim)
        self.codebooks = nn.Parameter(book)  # (L, K, d)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x)  # (B, d)
        return F.normalize(z, dim=1) if self.cfg.normalize_latent else z

    def quantise(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Greedy residual quantisation with grads: (residuals, quantised, codes)."""
        r = z
        residuals, quantised, codes = [], [], []
        for book in self.codebooks:  # (K, d)
            with torch.no_grad():
                c = squared_distances(r, book).argmin(1)  # (B,)
            e = book[c]  # (B, d)
            residuals.append(r)
            quantised.append(e)
            codes.append(c)
            r = r - e.detach()
        return torch.stack(residuals, 1), torch.stack(quantised, 1), torch.stack(codes, 1)  # (B, L, d) x2, (B, L)

    def forward(self, x: torch.Tensor) -> RQVAEOutput:
        z = self.encode(x)  # (B, d)
        residuals, quantised, codes = self.quantise(z)
        z_hat = quantised.detach().sum(1)  # (B, d)
        through = rotation_trick if self.cfg.gradient == "rotation" else straight_through
        x_hat = self.decoder(through(z, z_hat))  # (B, D_in)
        return RQVAEOutput(x_hat, z, residuals, quantised, codes)


def rqvae_loss(x: torch.Tensor, out: RQVAEOutput, beta: float) -> RQVAELoss:
    """TIGER Eq. 1: recon + sum_l (codebook + beta * commitment), squared norms averaged over items."""
    recon = (out.x_hat - x).pow(2).sum(1).mean()
    codebook = (out.quantised - out.residuals.detach()).pow(2).sum(2).mean(0).sum()
    commitment = (out.residuals - out.quantised.detach()).pow(2).sum(2).mean(0).sum()
    return RQVAELoss(recon + codebook + beta * commitment, recon, codebook, commitment)


@torch.no_grad()
def level_residuals(model: RQVAE, x: torch.Tensor) -> torch.Tensor:
    """r_l for every item and level under the current codebooks."""
    return model.quantise(model.encode(x))[0]  # (N, L, d)


@torch.no_grad()
def init_codebooks_kmeans(model: RQVAE, x: torch.Tensor, iters: int, gen: torch.Generator) -> None:
    """C_l <- k-means centroids of the level-l residuals of all items, level by level."""
    r = model.encode(x)  # (N, d)
    for level in range(model.cfg.num_levels):
        centroids, assign = kmeans(r, model.cfg.codebook_size, iters, gen)
        model.codebooks[level].copy_(centroids)
        r = r - centroids[assign]


@torch.no_grad()
def restart_dead_codes(model: RQVAE, x: torch.Tensor, usage: torch.Tensor, gen: torch.Generator) -> list[int]:
    """Set every code unused this epoch (usage (L, K) == 0) to a random item's residual.

    Levels are handled in order, so level l+1 draws from residuals under the repaired C_l.
    Returns the number of codes restarted per level.
    """
    n = x.shape[0]
    r = model.encode(x)  # (N, d)
    restarted = []
    for level in range(model.cfg.num_levels):
        book = model.codebooks[level]  # (K, d)
        dead = torch.nonzero(usage[level] == 0).squeeze(1)  # (E,)
        if dead.numel():
            pick = torch.randperm(n, generator=gen)[: dead.numel()].to(x.device)  # (E,)
            book[dead.to(book.device)] = r[pick]
        restarted.append(int(dead.numel()))
        r = r - book[squared_distances(r, book).argmin(1)]
    return restarted


class Encoding(NamedTuple):
    codes: np.ndarray  # (N, L) int64
    last_level_distances: np.ndarray  # (N, K) float32, ||r_L - C_L[k]||^2
    final_residuals: np.ndarray  # (N, d) float32, z - z_hat


@dataclass
class RQVAEResult:
    model: RQVAE
    codes: np.ndarray  # (N, L) int64, from encode_codes after training
    last_level_distances: np.ndarray  # (N, K) float32, input to semantic_ids.reassign_last_level
    # One record per epoch: loss terms (batch-weighted means of rqvae_loss, so "recon" is the
    # per-item squared error), utilisation during the epoch (L,), codes restarted after it (L,).
    history: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Contiguous CPU tensors, ready for safetensors.torch.save_file."""
        return {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}


def _as_embeddings(embeddings: np.ndarray | torch.Tensor, what: str) -> torch.Tensor:
    if torch.is_tensor(embeddings):
        x = embeddings.detach()
    else:
        arr = np.asarray(embeddings)
        if arr.dtype.kind != "f":
            raise ValueError(f"{what}: embeddings must be floating point, got {arr.dtype}")
        x = torch.tensor(arr)  # a copy: np.load'ed arrays may be read-only
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{what}: embeddings must be a non-empty (N, D_in) array, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{what}: embeddings must be floating point, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what}: embeddings contain NaN or inf")
    return x.float()


def _model_device(model: RQVAE) -> torch.device:
    return model.codebooks.device


@torch.no_grad()
def encode_codes(model: RQVAE, embeddings: np.ndarray | torch.Tensor) -> Encoding:
    """Deterministic semantic IDs of all items (eval mode, nearest codes, ties to lowest index)."""
    x = _as_embeddings(embeddings, "encode_codes")
    was_training = model.training
    model.eval()
    parts = []
    for start in range(0, x.shape[0], _ENCODE_CHUNK):
        z = model.encode(x[start : start + _ENCODE_CHUNK].to(_model_device(model)))  # (n, d)
        parts.append(residual_quantise(z, list(model.codebooks)))
    model.train(was_training)
    codes = torch.cat([p.codes for p in parts]).cpu().numpy().astype(np.int64)  # (N, L)
    dist = torch.cat([p.last_level_distances for p in parts]).cpu().numpy().astype(np.float32)  # (N, K)
    resid = torch.cat([p.final_residual for p in parts]).cpu().numpy().astype(np.float32)  # (N, d)
    return Encoding(codes, dist, resid)


@torch.no_grad()
def reconstruction_error(model: RQVAE, embeddings: np.ndarray | torch.Tensor) -> float:
    """Mean squared error (over items and coordinates) of x and decoder(z_hat)."""
    x = _as_embeddings(embeddings, "reconstruction_error")
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, x.shape[0], _ENCODE_CHUNK):
        xb = x[start : start + _ENCODE_CHUNK].to(_model_device(model))
        total += float((model(xb).x_hat - xb).pow(2).sum())
    model.train(was_training)
    return total / x.numel()


def _check_codes(codes: np.ndarray | torch.Tensor, k: int, what: str) -> np.ndarray:
    c = codes.cpu().numpy() if torch.is_tensor(codes) else np.asarray(codes)
    if c.ndim != 2 or c.shape[0] == 0:
        raise ValueError(f"{what}: codes must be a non-empty (N, L) array, got shape {c.shape}")
    if k < 1 or c.min() < 0 or c.max() >= k:
        raise ValueError(f"{what}: codes must lie in [0, {k}), got range [{c.min()}, {c.max()}]")
    return c.astype(np.int64)


def code_utilisation(codes: np.ndarray | torch.Tensor, k: int) -> list[float]:
    """Per level, the share of the K codes used by at least one item."""
    c = _check_codes(codes, k, "code_utilisation")
    return [len(np.unique(c[:, level])) / k for level in range(c.shape[1])]


def code_perplexity(codes: np.ndarray | torch.Tensor, k: int) -> list[float]:
    """Per level, exp(entropy) of the code-usage distribution (1 = one code, K = uniform)."""
    c = _check_codes(codes, k, "code_perplexity")
    out = []
    for level in range(c.shape[1]):
        p = np.bincount(c[:, level], minlength=k) / c.shape[0]
        p = p[p > 0]
        out.append(float(np.exp(-(p * np.log(p)).sum())))
    return out


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=gen)  # (N,)
    return list(perm.split(batch_size))


def train_epoch(
    model: RQVAE, x: torch.Tensor, opt: torch.optim.Optimizer, gen: torch.Generator
) -> tuple[dict[str, float], torch.Tensor]:
    """One pass over the items in random mini-batches: (mean loss terms, code usage (L, K))."""
    cfg = model.cfg
    usage = torch.zeros(cfg.num_levels, cfg.codebook_size, dtype=torch.long, device=x.device)
    sums = torch.zeros(4, device=x.device)  # loss, recon, codebook, commitment
    for idx in _batches(x.shape[0], cfg.batch_size, gen):
        xb = x[idx.to(x.device)]  # (B, D_in)
        out = model(xb)
        terms = rqvae_loss(xb, out, cfg.commitment_beta)
        opt.zero_grad(set_to_none=True)
        terms.total.backward()
        opt.step()
        usage.scatter_add_(1, out.codes.T, torch.ones_like(out.codes.T))
        sums += xb.shape[0] / x.shape[0] * torch.stack([t.detach() for t in terms])
    return dict(zip(("loss", "recon", "codebook", "commitment"), sums.tolist())), usage


def _optimizer(model: RQVAE, cfg: RQVAEConfig) -> torch.optim.Optimizer:
    mlp_params = [p for n, p in model.named_parameters() if n != "codebooks"]
    groups = [
        {"params": mlp_params, "weight_decay": cfg.weight_decay},
        {"params": [model.codebooks], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr)


_ARCHITECTURE = ("num_levels", "codebook_size", "latent_dim", "hidden_dims", "normalize_latent")


def _adopt(model: RQVAE, cfg: RQVAEConfig, input_dim: int) -> RQVAE:
    """Train a given model under cfg; its shape-defining fields must agree."""
    if model.encoder[0].in_features != input_dim:
        raise ValueError(f"train_rqvae: model expects D_in={model.encoder[0].in_features}, got {input_dim}")
    for name in _ARCHITECTURE:
        if getattr(model.cfg, name) != getattr(cfg, name):
            raise ValueError(
                f"train_rqvae: model was built with {name}={getattr(model.cfg, name)!r}, cfg has {getattr(cfg, name)!r}"
            )
    model.cfg = cfg
    return model


def train_rqvae(
    embeddings: np.ndarray | torch.Tensor,
    cfg: RQVAEConfig,
    progress: Callable[[int, dict[str, Any]], None] | None = None,
    *,
    model: RQVAE | None = None,
) -> RQVAEResult:
    """Train an RQ-VAE on item embeddings (N, D_in) and encode every item.

    `model`, when given, is trained as it is (no fresh weights, no k-means init); tests use it
    to start from a deliberately collapsed codebook. `progress(epoch, record)` is called after
    each epoch with that epoch's history record. Deterministic on CPU for a given cfg.seed;
    the global RNG state is left untouched.
    """
    x = _as_embeddings(embeddings, "train_rqvae")
    if x.shape[0] < cfg.codebook_size:
        raise ValueError(
            f"train_rqvae: {x.shape[0]} items cannot fill codebooks of size {cfg.codebook_size}; "
            "lower rqvae.codebook_size"
        )
    device = resolve_device(cfg.device)
    x = x.to(device)
    gen = make_generator(cfg.seed)  # CPU: the same draws on every device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if model is None:
            model = RQVAE(x.shape[1], cfg).to(device)
            if cfg.kmeans_init:
                init_codebooks_kmeans(model, x, cfg.kmeans_iters, make_generator(cfg.seed, device))
        else:
            model = _adopt(model, cfg, x.shape[1]).to(device)
        model.train()
        opt = _optimizer(model, cfg)
        history: list[dict[str, Any]] = []
        for epoch in range(cfg.epochs):
            terms, usage = train_epoch(model, x, opt, gen)
            restarted = [0] * cfg.num_levels
            if cfg.dead_code_restart and epoch < cfg.epochs - 1:
                restarted = restart_dead_codes(model, x, usage, gen)
            record = {
                "epoch": epoch,
                **terms,
                "utilisation": ((usage > 0).sum(1).float() / cfg.codebook_size).tolist(),
                "restarted": restarted,
            }
            history.append(record)
            if progress is not None:
                progress(epoch, record)
    enc = encode_codes(model, x)
    return RQVAEResult(model, enc.codes, enc.last_level_distances, history)
