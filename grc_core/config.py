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
    # Each history item's own learned embedding (a table of N_items rows) added to its code
    # embeddings in the encoder. A default here is only for backbones saved before the field.
    item_embedding: bool = False
    # SASRec's user state (its frozen model's last hidden state over the same history) projected to
    # D and added to the encoder's output as one more memory position (grc_core/model.py).
    cf_token: bool = False
    # A dense retrieval head beside the generative one (LIGER-style): the decoder's BOS state,
    # projected, scores every item against an N_items x D table plus a bias; trained by full-softmax
    # cross-entropy on the target item at `backbone.dense_loss_weight` (grc_core/model.py).
    dense_head: bool = False


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
    # Decay of an exponential moving average of the weights, which validation, selection and the
    # kept `best` use (0: off, the raw weights; grc_core/train.py `ema_update`). A default so that
    # the loops and saved models without the field read as before.
    ema_decay: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"TrainConfig: ema_decay must be in [0, 1), got {self.ema_decay}")


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
    # torch intra-op threads on CPU while training (0: leave torch's default). The float order, and
    # so the trained weights, depend on it: a default here is only for models saved before the field.
    threads: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.hidden >= 1 and self.heads >= 1, "hidden and heads must be >= 1"),
            (self.threads >= 0, "threads must be >= 0"),
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


@dataclass(frozen=True)
class ValueConfig:
    """V-STAR's prefix value model and its TD(0) training (grc_core/value.py): params.yaml `vstar.value`."""

    d_ff: int  # feed-forward width of the head's Transformer block and its MLP
    n_heads: int  # attention heads of that block (divides the policy's d_model)
    level_weights: tuple[float, ...]  # w_l of the dense semantic step reward, one per level, increasing
    gamma: float  # TD discount
    steps: int  # pretraining steps on the frozen backbone, before RL
    users_per_step: int  # training instances per value step
    samples: int  # candidates sampled from the policy per user (the set C(x) of Eq. 6)
    lr: float  # AdamW learning rate of the head

    def __post_init__(self) -> None:
        w = self.level_weights
        checks = [
            (len(w) >= 1 and all(x > 0 for x in w), "level_weights must be positive"),
            (all(a <= b for a, b in zip(w, w[1:])), "level_weights must not decrease"),
            (0.0 < self.gamma <= 1.0, "gamma must be in (0, 1]"),
            (self.d_ff >= 1 and self.n_heads >= 1, "d_ff and n_heads must be >= 1"),
            (self.steps >= 0 and self.users_per_step >= 1 and self.samples >= 1,
             "steps >= 0, users_per_step >= 1 and samples >= 1"),
            (self.lr > 0, "lr must be > 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"ValueConfig: {msg} ({self})")


@dataclass(frozen=True)
class VEDConfig:
    """Value-guided efficient decoding (grc_core/ved.py): params.yaml `vstar.ved` and `vstar.ved_test`."""

    init_beam: int  # width of the probability-guided beam that seeds the tree
    candidates: int  # items returned per user (top-valued leaves, then filled from cached policy rows)
    budget: int  # backbone forward tokens per user, the initial tree included
    entropy_weight: float  # lambda of G = value_weight V + lambda H (Eq. 11)
    ucb_beta: float  # beta of the UCB selection (Eq. 13)
    expand: Literal["sample", "greedy"]  # the new child: sampled from the policy over unexpanded children, or its argmax
    max_iters: int  # cap on selection rounds (a round that expands nothing costs no forward token)
    value_weight: float = 1.0  # weight of V in G (Eq. 11 has 1; 0 is the entropy-only priority of the paper's ablation)

    def __post_init__(self) -> None:
        if self.init_beam < 1 or self.candidates < 1 or self.budget < 1 or self.max_iters < 0:
            raise ValueError(f"VEDConfig: init_beam, candidates, budget must be >= 1 and max_iters >= 0 ({self})")
        if self.expand not in ("sample", "greedy"):
            raise ValueError(f"VEDConfig: expand must be sample | greedy, got {self.expand!r}")


@dataclass(frozen=True)
class SiblingConfig:
    """Sibling-GRPO's loss and reward (grc_core/sibling_grpo.py): params.yaml `vstar.rl`."""

    sibling_weight: float  # eta: loss = (1 - eta) GRPO + eta Sibling-GRPO (0: plain GRPO)
    dense_weight: float  # R(x, y) = 1[y = target] + dense_weight * sum_l r_l (0: the paper's exact-match reward)
    clip_eps: float  # epsilon of the clipped surrogate
    kl_beta: float  # k3 KL penalty to the backbone
    ppo_epochs: int  # optimisation steps per batch of candidates
    eps: float  # sigma guard of the sibling advantage (Eq. 18)

    def __post_init__(self) -> None:
        if not 0.0 <= self.sibling_weight <= 1.0 or self.ppo_epochs < 1 or self.eps <= 0 or self.clip_eps <= 0:
            raise ValueError(f"SiblingConfig: need sibling_weight in [0, 1], ppo_epochs >= 1, eps > 0, clip_eps > 0 ({self})")


@dataclass(frozen=True)
class VStarLoopConfig:
    """The RL loop of the `vstar` stage (grc_core/sibling_grpo.py `run_vstar`): params.yaml `vstar.loop`."""

    iterations: int  # candidate construction + update iterations
    users_per_step: int  # training instances per iteration
    lr: float  # AdamW learning rate of the policy (constant)
    weight_decay: float
    grad_clip: float  # gradient-norm clip (0: none)
    eval_every: int  # iterations between validations (and checkpoints)
    seed: int  # instance stream, sampling

    def __post_init__(self) -> None:
        if self.iterations < 0 or self.users_per_step < 1 or self.eval_every < 1:
            raise ValueError(f"VStarLoopConfig: need iterations >= 0, users_per_step >= 1, eval_every >= 1 ({self})")
