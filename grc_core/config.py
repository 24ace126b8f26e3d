"""The typed configs of the core's models and training loops: plain dataclasses, no torch.

`tasks/params.py` builds them from params.yaml; they live apart from the modules that use them so
that reading params does not load the model code (a stage's code deps are its import closure).
Every field comes from params.yaml: none has a default that a forgotten argument would pick.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ModelConfig:
    d_model: int  # D
    d_ff: int
    n_heads: int
    encoder_layers: int
    decoder_layers: int
    dropout: float
    layout: Literal["item", "code"]
    max_history: int  # T


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    min_lr_ratio: float
    grad_clip: float
    eval_every: int  # epochs between validations
    patience: int  # validations without improvement before stopping (0: never stop early)
    seed: int
    device: str
    threads: int  # torch intra-op threads on CPU (0: leave torch's default)


@dataclass(frozen=True)
class RQVAEConfig:
    num_levels: int  # L
    codebook_size: int  # K
    latent_dim: int  # d
    hidden_dims: tuple[int, ...]  # encoder widths; the decoder mirrors them
    epochs: int
    batch_size: int  # >= N means full batch
    lr: float
    weight_decay: float  # AdamW, MLP weights only
    commitment_beta: float
    kmeans_init: bool
    kmeans_iters: int
    dead_code_restart: bool
    gradient: Literal["ste", "rotation"]
    seed: int
    device: str  # "cpu", "cuda", "cuda:1", or "auto" (CUDA where present)
    normalize_latent: bool  # L2-normalise the encoder output z

    def __post_init__(self) -> None:
        checks = [
            (self.num_levels >= 1, "num_levels must be >= 1"),
            (self.codebook_size >= 2, "codebook_size must be >= 2"),
            (self.latent_dim >= 1, "latent_dim must be >= 1"),
            (all(h >= 1 for h in self.hidden_dims), "hidden_dims must all be >= 1"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.commitment_beta >= 0, "commitment_beta must be >= 0"),
            (self.kmeans_iters >= 0, "kmeans_iters must be >= 0"),
            (self.gradient in ("ste", "rotation"), "gradient must be 'ste' or 'rotation'"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"RQVAEConfig: {msg} ({self})")


@dataclass(frozen=True)
class SASRecConfig:
    hidden: int  # D
    layers: int
    heads: int
    dropout: float
    max_len: int  # T, most recent items the model sees
    lr: float
    weight_decay: float
    epochs: int
    batch_size: int  # training windows per step
    seed: int
    device: str  # "cpu", "cuda", "cuda:1", or "auto" (CUDA where present)
    patience: int  # epochs without a better validation Recall@10 before stopping
    repeat_bias: bool  # learn one logit offset for items already in the history

    def __post_init__(self) -> None:
        checks = [
            (self.hidden >= 1 and self.heads >= 1, "hidden and heads must be >= 1"),
            (self.hidden % self.heads == 0, "hidden must be divisible by heads"),
            (self.layers >= 1, "layers must be >= 1"),
            (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
            (self.max_len >= 1, "max_len must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.epochs >= 1 and self.batch_size >= 1, "epochs and batch_size must be >= 1"),
            (self.patience >= 1, "patience must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"SASRecConfig: {msg} ({self})")


@dataclass(frozen=True)
class GRPOConfig:
    """GRPO's rollout and loss (grc_core/grpo.py): params.yaml `grpo.rollout`."""

    group_size: int  # G episodes per user
    clip_eps: float  # epsilon of the clipped surrogate
    kl_beta: float  # beta of the KL penalty to the SFT policy
    ppo_epochs: int  # optimisation steps per batch of episodes
    temperature: float  # sampling temperature of every segment
    advantage: Literal["zscore", "rank"]  # Eq. 22


@dataclass(frozen=True)
class LoopConfig:
    """GRPO's outer loop (grc_core/grpo.py `run_grpo`): params.yaml `grpo.loop`."""

    iterations: int  # rollout + update iterations
    users_per_step: int  # training instances per iteration
    lr: float  # AdamW learning rate (constant)
    weight_decay: float
    grad_clip: float  # gradient-norm clip (0: none)
    eval_every: int  # iterations between validations (and checkpoints)
    seed: int  # instance stream and sampling
    draft_advantage: Literal["episode", "task"]  # the paper: episode; task: grc_core/grpo.py's docstring

    def __post_init__(self) -> None:
        if self.draft_advantage not in ("episode", "task"):
            raise ValueError(f"draft_advantage must be episode | task, got {self.draft_advantage!r}")


@dataclass(frozen=True)
class RewardConfig:
    """The weights and ablation switches of the GRC rewards (grc_core/rewards.py): params.yaml `grpo.reward`."""

    beta_cor: float  # weight of R_cor in R (Eq. 13)
    beta_last: float  # weight of l1 in R_task (Eq. 15)
    beta_loc: float  # weight of R_loc in R_cor (Eq. 16)
    beta_sem: float  # weight of R_sem in R_cor (Eq. 16)
    eps: float  # Eq. 18 denominator guard
    use_task: bool  # False: "w/o R_task" (Table 3)
    use_cor: bool  # False: "w/o R_cor", the whole correction term
    use_loc: bool  # False: "w/o R_loc"
    use_sem: bool  # False: "w/o R_sem"
    use_delta: bool  # False: "w/o R_delta"

    def __post_init__(self) -> None:
        if not self.eps > 0:
            raise ValueError(f"RewardConfig.eps must be > 0, got {self.eps}")


@dataclass(frozen=True)
class SFTLossConfig:
    """Eq. 10 (grc_core/grc.py `sft_loss`): params.yaml `sft.lambda_rc`, `sft.draft_loss`."""

    lambda_rc: float  # weight of the reflection + correction loss
    draft_loss: str  # what L_MLE supervises on the draft segment: target | draft | none
