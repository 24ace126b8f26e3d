"""Generation-Reflection-Correction (GRC paper Sec. 4.1 and 4.3) on top of the TIGER-style backbone.

Template (Eq. 7). With L semantic-ID levels and K attributes, the decoder reads one sequence
of 2L+K+4 input positions (the paper's length; the target sequence o is the input shifted by one):

    pos 0            BOS1                    -> predicts draft code d_1   (level head 0)
    pos 1..L         d_1 .. d_L              -> d_t predicts d_{t+1}; d_L predicts EOF1 (not trained)
    pos L+1          EOF1                    -> nothing
    pos L+2+j        reflection slot j       -> r_j, j = 0..K (r_0 = r_loc, r_k = r_sem,a_k)
    pos L+K+3        EOF2 (+ the labels)     -> corrected code g_1        (level head 0)
    pos L+K+4..      g_1 .. g_L              -> g_t predicts g_{t+1}; g_L predicts EOF3 (not trained)

L counts every level of the ID, the disambiguation level included (Instruments: 4 + 1 = 5).

Parallel reflection (Eq. 8): the K+1 slot positions carry a learned query per slot, not the
labels, and the self-attention mask lets each slot see BOS1..EOF1 and itself only, so slot j's
prediction depends on the history and the draft and on no other reflection slot. The reflection
labels enter the correction segment through the EOF2 position, whose input is the EOF2
embedding plus one embedding per label value (r_loc and each r_sem,a_k); every correction
position sees the whole prefix. This keeps the paper's length and makes "predict all slots in
one forward pass" exact. GC-SFT (`reflect=False`) drops the slots and the label embeddings:
[BOS1, d, EOF1, EOF2, g], length 2L+3.

Shared weights: the draft and the correction use the backbone's code embeddings and per-level
heads (one token vocabulary per level); new are EOF1, EOF2, the slot queries, the label-value
embeddings and the reflection heads (r_loc: L+1 classes; each r_sem: 2 classes).

Loss (Eq. 10): L_SFT = L_MLE + lambda_rc * L_rc, with L_rc the reflection cross-entropies
summed over slots plus the correction cross-entropies summed over levels, averaged over rows.
What L_MLE supervises on the draft segment is a choice (`draft_loss`): "target" = the
backbone's pre-training loss (Eq. 1) on the ground truth, teacher-forced from BOS1 (keeps the
first pass a recommender); "draft" = the draft tokens themselves in the template (the literal
reading of Eq. 10: imitate the backbone's own beam); "none". docs/DESIGN.md has the measurement.

Two-pass inference (`grc_decode`, Sec. 4.3), one function per step:
1. Drafts: the backbone's beam search, B per user, keeping the decoder KV cache.
2. `reflect`: one batched chunk [d_L, EOF1, slot_0..slot_K] for the drafts on top of their cached
   keys/values (`reflect_on_cache`); argmax labels per slot. `reflection_entropy`: the mean slot
   entropy H_b (Eq. 24).
3. `correction_start_scores`: score_b + alpha_e * H_b (Eq. 25; alpha_e = 0 is plain GRC); drafts
   whose reflection says "correct" (r_loc = L+1) start at -inf: they are kept as they are.
   `correct`: EOF2 + label embeddings (`open_correction`), then one constrained beam search whose
   start beams are the drafts at those scores, keeping the best `B_cor` continuations over all
   drafts (the fixed beam budget of Sec. 4.3).
4. `merge_by_rule` (`rank_rule`). "joint" (the paper's reading: a draft judged wrong is replaced
   by its correction): kept drafts with their draft score and corrected items with their search
   score (draft score + alpha_e * H + correction log-prob), de-duplicated by item with the best
   score, sorted; then `backfill`: the remaining drafts in draft order fill the list up to B.
   "union": every draft stays with its draft score and the corrections join it, so a draft
   always outranks its own corrections and corrections of strong drafts displace the weakest
   drafts. "marginal": the two-pass model as a mixture,
   p(i) = sum_b p(b) [q_b 1(i = b) + (1 - q_b) p_cor(i | b, r_b)] with
   q_b = p(r_loc = L+1 | b), summed over the beams' candidates (log-sum-exp per item); every
   draft goes to correction, starting at score_b + log(1 - q_b) (+ alpha_e * H).
   "verify" (not in the paper: the reflection as a verifier): no correction pass; the R reflected
   drafts are re-ordered among themselves by score_b + gamma * log q_b (`verify_gamma`), the
   rest follow in draft order. gamma = 0 is the backbone's own ranking.
Reflection budget (`reflect_width` R): only the best R drafts are reflected on and corrected;
the other drafts keep their place and score (the correction then costs R/B of a full pass).

A collaborative prefix value (not in the paper; grc_core/cf_value.py), `cf_weight` w > 0 with
the item log-probabilities of a collaborative model passed to `grc_decode`: the draft beam
prunes on log pi + w V_cf like `tiger_cf`, so the drafts' scores, and with them the correction
start scores of Eq. 25, carry w log p_cf(draft); the correction beam prunes on the same fused
key, so a correction ends at start + log pi_cor(g) + w log p_cf(g).

Drafts from another decoder (not in the paper; V-STAR issue, `evaluate.grc_drafts: ved`): step 1
may take its B candidates from VED (grc_core/ved.py, run by the caller, `rank_with_grc`) instead of
the beam. `grc_decode(..., draft_items=...)` then scores each given draft as the beam scores its
own, log pi(d) (+ w log p_cf(d) where cf_weight > 0), orders them by it, and builds the decoder
cache of their positions 0..L-1 with one teacher-forced pass (`given_drafts`), so steps 2-4 run
unchanged. VED's own value orders its tree, not the drafts: the merge of step 4 compares draft
and correction scores, which must be on the beam's scale.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from grc_core.beam_search import BeamResult, BeamTrace, beam_search
from grc_core.cf_value import item_prefix_nodes, prefix_values
from grc_core.config import SFTLossConfig, VEDConfig
from grc_core.model import (BackboneStepper, Batch, DecodeState, Memory, Seq2Seq, causal_mask,
                            decoder_step, sequence_loss)
from grc_core.trie import PrefixTrie

NEG_INF = float("-inf")


@dataclass(frozen=True)
class Template:
    """Positions of the template for L levels and K attributes (see the module docstring)."""

    num_levels: int  # L
    num_attrs: int  # K
    reflect: bool = True

    @property
    def num_slots(self) -> int:
        return self.num_attrs + 1 if self.reflect else 0

    @property
    def eof1(self) -> int:
        return self.num_levels + 1

    @property
    def first_slot(self) -> int:
        return self.num_levels + 2

    @property
    def eof2(self) -> int:
        return self.first_slot + self.num_slots

    @property
    def length(self) -> int:
        """Input positions: BOS1, L draft codes, EOF1, slots, EOF2, L corrected codes."""
        return self.eof2 + 1 + self.num_levels


def template_mask(t: Template, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive (S, S) self-attention mask: causal, and reflection slots blind to each other."""
    s = t.length
    allowed = torch.ones(s, s, dtype=torch.bool, device=device).tril()  # (S, S) causal
    slots = torch.arange(t.first_slot, t.eof2, device=device)
    allowed[slots[:, None], slots[None, :]] = torch.eye(len(slots), dtype=torch.bool, device=device)
    return torch.zeros(s, s, dtype=dtype, device=device).masked_fill(~allowed, NEG_INF)


def chunk_mask(t: Template, start: int, size: int, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows start..start+size-1 of `template_mask` over columns 0..start+size-1: (size, start+size)."""
    return template_mask(t, device, dtype)[start : start + size, : start + size]


class TemplateOutput(NamedTuple):
    draft: list[torch.Tensor]  # per level (N, V_l): logits for d_1..d_L
    reflect: list[torch.Tensor]  # per slot (N, C_j): logits for r_loc (C = L+1) and each r_sem (C = 2)
    correct: list[torch.Tensor]  # per level (N, V_l): logits for g_1..g_L


class GRCModel(nn.Module):
    """The backbone plus the template's special embeddings and reflection heads."""

    def __init__(self, seq: Seq2Seq, num_attrs: int, reflect: bool = True):
        super().__init__()
        self.seq = seq
        d, n_levels = seq.cfg.d_model, seq.num_levels
        self.template = Template(n_levels, num_attrs, reflect)
        self.eof1 = nn.Parameter(torch.randn(d) * 0.02)
        self.eof2 = nn.Parameter(torch.randn(d) * 0.02)
        n_slots = self.template.num_slots
        self.slots = nn.Embedding(max(n_slots, 1), d)
        self.loc_values = nn.Embedding(n_levels + 1, d)  # r_loc - 1 in 0..L
        self.sem_values = nn.ModuleList(nn.Embedding(2, d) for _ in range(num_attrs if reflect else 0))
        self.loc_head = nn.Linear(d, n_levels + 1)
        self.sem_heads = nn.ModuleList(nn.Linear(d, 2) for _ in range(num_attrs if reflect else 0))
        for m in [self.slots, self.loc_values, *self.sem_values]:
            nn.init.normal_(m.weight, std=0.02)
        for m in [self.loc_head, *self.sem_heads]:
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    @property
    def num_levels(self) -> int:
        return self.seq.num_levels

    def slot_inputs(self, lead: tuple[int, ...]) -> torch.Tensor:
        """The K+1 slot queries, (…, K+1, D)."""
        t = self.template
        return self.slots.weight[: t.num_slots].expand(*lead, t.num_slots, -1)

    def eof2_input(self, r_loc: torch.Tensor | None, r_sem: torch.Tensor | None) -> torch.Tensor:
        """EOF2 plus the label embeddings: r_loc (…,) in 1..L+1, r_sem (…, K) in {0, 1} -> (…, D)."""
        if not self.template.reflect:
            lead = () if r_loc is None else r_loc.shape
            return self.eof2.expand(*lead, -1)
        x = self.eof2 + self.loc_values(r_loc - 1)  # (…, D)
        for k, emb in enumerate(self.sem_values):
            x = x + emb(r_sem[..., k])
        return x

    def template_inputs(self, draft: torch.Tensor, r_loc: torch.Tensor, r_sem: torch.Tensor,
                        target: torch.Tensor) -> torch.Tensor:
        """Teacher-forced inputs (N, S, D) from draft (N, L), labels and target (N, L)."""
        seq, n = self.seq, draft.shape[0]
        d_part = seq.embed_decoder_codes(draft)  # (N, L+1, D): BOS1, d_1..d_L
        eof1 = self.eof1.expand(n, 1, -1)  # (N, 1, D)
        slots = self.slot_inputs((n,))  # (N, K+1, D) or (N, 0, D)
        eof2 = self.eof2_input(r_loc, r_sem)[:, None]  # (N, 1, D)
        g_part = torch.stack([seq.dec_codes[j](target[:, j]) for j in range(self.num_levels)], 1)  # (N, L, D)
        return torch.cat([d_part, eof1, slots, eof2, g_part], dim=1)  # (N, 2L+K+4, D)

    def forward(self, memory: Memory, draft: torch.Tensor, r_loc: torch.Tensor, r_sem: torch.Tensor,
                target: torch.Tensor) -> TemplateOutput:
        """One teacher-forced pass over the whole template. `memory` rows align with draft rows."""
        t, seq = self.template, self.seq
        x = self.template_inputs(draft, r_loc, r_sem, target)[:, :-1]  # (N, S-1, D): g_L predicts only EOF3
        mask = template_mask(t, x.device, x.dtype)[:-1, :-1]
        h = seq.decode(x, memory, mask)  # (N, S-1, D)
        n_levels = self.num_levels
        draft_logits = [seq.heads[j](h[:, j]) for j in range(n_levels)]
        refl = [self.loc_head(h[:, t.first_slot])] if t.reflect else []
        refl += [head(h[:, t.first_slot + 1 + k]) for k, head in enumerate(self.sem_heads)]
        correct_logits = [seq.heads[j](h[:, t.eof2 + j]) for j in range(n_levels)]
        return TemplateOutput(draft_logits, refl, correct_logits)

    def reflection_logits(self, hidden_slots: torch.Tensor) -> list[torch.Tensor]:
        """Slot hidden states (…, K+1, D) -> logits per slot."""
        if not self.template.reflect:
            return []
        out = [self.loc_head(hidden_slots[..., 0, :])]
        return out + [head(hidden_slots[..., 1 + k, :]) for k, head in enumerate(self.sem_heads)]


def grc_from_config(cfg: dict) -> GRCModel:
    """An untrained template model of the architecture a saved `config.json` describes (model,
    level_sizes, attr_sizes, num_attrs, variant); the caller loads the weights."""
    seq = Seq2Seq.from_architecture(cfg)
    return GRCModel(seq, cfg["num_attrs"], reflect=cfg["variant"] == "grc")


def expand_memory(memory: Memory, repeats: int) -> Memory:
    """Each user's encoder memory repeated for `repeats` consecutive rows."""
    if repeats == 1:
        return memory
    rep = lambda x: x.repeat_interleave(repeats, dim=0)  # noqa: E731
    return Memory([rep(k) for k in memory.keys], [rep(v) for v in memory.values], rep(memory.mask))




def sft_loss(model: GRCModel, batch: Batch, draft: torch.Tensor, r_loc: torch.Tensor, r_sem: torch.Tensor,
             cfg: SFTLossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 10 for B instances with M candidates each.

    batch: B instances (histories, target codes (B, L)); draft (B, M, L); r_loc (B, M); r_sem (B, M, K).
    Every term is a mean over rows; L_rc sums its slots and levels like Eq. 10.
    """
    if cfg.draft_loss not in ("target", "draft", "none"):
        raise ValueError(f"sft draft_loss must be target | draft | none, got {cfg.draft_loss!r}")
    b, m, n_levels = draft.shape
    memory = model.seq.encode(batch)
    target = batch.target_codes  # (B, L)
    rows = expand_memory(memory, m)
    tgt = target.repeat_interleave(m, dim=0)  # (B*M, L)
    out = model(rows, draft.reshape(b * m, n_levels), r_loc.reshape(-1), r_sem.reshape(b * m, -1), tgt)
    refl = sum((F.cross_entropy(lg, lab) for lg, lab in
                zip(out.reflect, [r_loc.reshape(-1) - 1, *r_sem.reshape(b * m, -1).unbind(1)])),
               torch.zeros((), device=draft.device))
    corr = sequence_loss(out.correct, tgt)
    if cfg.draft_loss == "target":
        x = model.seq.embed_decoder_codes(target[:, :-1])  # (B, L, D)
        mle = sequence_loss(model.seq.level_logits(model.seq.decode(x, memory)), target)
    elif cfg.draft_loss == "draft":
        mle = sequence_loss(out.draft, draft.reshape(b * m, n_levels))
    else:
        mle = torch.zeros((), device=draft.device)
    loss = mle + cfg.lambda_rc * (refl + corr)
    return loss, {"mle": float(mle.detach()), "reflect": float(refl.detach()), "correct": float(corr.detach())}


RANK_RULES = ("joint", "union", "marginal", "verify")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class DecodeConfig:
    width: int  # B, drafts per user and the final list length
    correct_width: int  # B_cor, beams of the correction pass (0: = width)
    alpha_e: float  # EGRS entropy coefficient (Eq. 25); 0: plain GRC inference
    reflect_width: int  # R, the best R drafts are reflected on and corrected, the rest kept as they are (0: all)
    rank_rule: str  # joint | union | marginal | verify: how drafts and corrections merge (module docstring, step 4)
    verify_gamma: float  # verify: weight gamma of log p(r_loc = L+1 | draft) in the drafts' order
    cf_weight: float  # w of the collaborative prefix value in both passes (0: off; module docstring)
    # VED's settings for the drafts (module docstring, "Drafts from another decoder"), read by the caller that
    # draws them (grc_core.evaluation.rank_with_grc); None: the drafts are the backbone's beam
    draft_ved: VEDConfig | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.width) or self.width < 1:
            raise ValueError(f"DecodeConfig.width must be a positive int, got {self.width!r}")
        for name in ("correct_width", "reflect_width"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"DecodeConfig.{name} must be an int >= 0, got {value!r}")
        a = self.alpha_e
        if isinstance(a, bool) or not isinstance(a, numbers.Real) or not math.isfinite(a) or a < 0:
            raise ValueError(f"DecodeConfig.alpha_e must be a finite number >= 0, got {a!r}")
        for name in ("verify_gamma", "cf_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
                raise ValueError(f"DecodeConfig.{name} must be a finite number >= 0, got {v!r}")
        if self.rank_rule not in RANK_RULES:
            raise ValueError(f"DecodeConfig.rank_rule must be {' | '.join(RANK_RULES)}, got {self.rank_rule!r}")
        if self.draft_ved is not None and not isinstance(self.draft_ved, VEDConfig):
            raise ValueError(f"DecodeConfig.draft_ved must be a VEDConfig or None, got {self.draft_ved!r}")


class GRCResult(NamedTuple):
    items: torch.Tensor  # (B, W) final ranking, -1 padding
    scores: torch.Tensor  # (B, W) merge scores, -inf padding
    drafts: BeamResult  # first pass, (B, W) items/scores, (B, W, L) codes
    reflection: torch.Tensor  # (B, W, K+1) argmax labels per draft: r_loc in 1..L+1, then r_sem in {0, 1}
    entropy: torch.Tensor  # (B, W) mean reflection-slot entropy (Eq. 24), 0 for GC
    corrected: BeamResult  # correction pass, (B, W_cor); W_cor = 0 under rank_rule "verify"
    source: torch.Tensor  # (B, W_cor) index of the draft each corrected item came from, -1 padding
    log_right: torch.Tensor  # (B, W) log p(r_loc = L+1 | draft), the verifier's score; -inf where not reflected


class Reflection(NamedTuple):
    """What the reflection pass says about the R reflected drafts of each user (argmax of each slot)."""

    labels: torch.Tensor  # (B, R, K+1) r_loc in 1..L+1, then r_sem in {0, 1}; (B, R, 0) for GC
    logps: list[torch.Tensor]  # per slot t (B, R, |V_t^ref|) log-probs: L+1 for r_loc, 2 per r_sem; [] for GC
    judged_correct: torch.Tensor  # (B, R) bool, r_loc = L+1: the draft is kept as it is (Sec. 4.3); False for GC
    log_right: torch.Tensor  # (B, R) log p(r_loc = L+1 | draft); -inf for GC


class _StartStepper(BackboneStepper):
    """BackboneStepper whose `begin` returns a precomputed start (the correction pass)."""

    def __init__(self, model: Seq2Seq, logp: torch.Tensor, state: DecodeState):
        super().__init__(model)
        self._start = (logp, state)

    def begin(self, batch) -> tuple[torch.Tensor, DecodeState]:
        return self._start


def reflect_on_cache(model: GRCModel, memory: Memory, keys: list[torch.Tensor], values: list[torch.Tensor],
                     draft: torch.Tensor) -> tuple[torch.Tensor, list, list]:
    """[d_L, EOF1, slot_0..slot_K] for (B, W) drafts (B, W, L) on top of their cache (positions 0..L-1).

    Returns the slot hidden states (B, W, K+1, D) and the cache extended to position L+K+2.
    """
    seq, t = model.seq, model.template
    n_levels, (b, w) = t.num_levels, draft.shape[:2]
    x = torch.cat([seq.dec_codes[n_levels - 1](draft[..., -1:]),  # (B, W, 1, D) d_L
                   model.eof1.expand(b, w, 1, -1),  # EOF1
                   model.slot_inputs((b, w))], dim=2)  # (B, W, 2+K+1, D)
    mask = chunk_mask(t, n_levels, x.shape[2], x.device, x.dtype)  # (C, L+C)
    hidden, keys, values = decoder_step(seq, memory, keys, values, x, n_levels, mask)  # (B, W, C, D)
    return hidden[:, :, 2:], keys, values


def open_correction(model: GRCModel, memory: Memory, keys: list[torch.Tensor], values: list[torch.Tensor],
                    r_loc: torch.Tensor | None, r_sem: torch.Tensor | None, lead: tuple[int, int]
                    ) -> tuple[torch.Tensor, list, list]:
    """EOF2 + the label embeddings at position L+K+3 for (B, W) beams: hidden (B, W, D) and the extended cache."""
    pos = model.template.eof2
    x = model.eof2_input(r_loc, r_sem).expand(*lead, -1)[:, :, None]  # (B, W, 1, D)
    hidden, keys, values = decoder_step(model.seq, memory, keys, values, x, pos,
                                        torch.zeros(1, pos + 1, dtype=x.dtype, device=x.device))
    return hidden[:, :, 0], keys, values


def reflect(model: GRCModel, drafts: BeamResult, trace: BeamTrace, reflect_width: int
            ) -> tuple[Reflection, DecodeState]:
    """The reflection stage (Sec. 4.3; parallel slots, Eq. 8): the best R drafts of each user go on
    from their own cached decoder states with [d_L, EOF1, slot_0..slot_K]; the labels are each
    slot's argmax. R = `reflect_width` (0: every draft).

    Returns the reflection and the decoder state through the slots (L+K+3 positions, (B, R) beams)
    that the correction pass continues.
    """
    t, state = model.template, trace.state
    n_beams = trace.parents.shape[1]
    r = min(reflect_width, n_beams) if reflect_width > 0 else n_beams
    idx = trace.parents[:, :r, None, None, None]  # (B, R, 1, 1, 1) each draft's row in the cache
    keys = [k.gather(1, idx.expand(-1, -1, *k.shape[2:])) for k in state.keys]  # (B, R, H, L, dh)
    values = [v.gather(1, idx.expand(-1, -1, *v.shape[2:])) for v in state.values]
    codes = drafts.codes[:, :r].clamp_min(0)  # (B, R, L) padding drafts read code 0; they stay -inf
    slots, keys, values = reflect_on_cache(model, state.memory, keys, values, codes)  # (B, R, K+1, D)
    after = DecodeState(state.memory, keys, values, t.eof2)
    b = codes.shape[0]
    if not t.reflect:
        labels = torch.zeros(b, r, 0, dtype=torch.long, device=codes.device)  # (B, R, 0)
        log_right = torch.full((b, r), NEG_INF, dtype=slots.dtype, device=codes.device)
        return Reflection(labels, [], torch.zeros_like(log_right, dtype=torch.bool), log_right), after
    logits = model.reflection_logits(slots)  # per slot (B, R, C_t)
    labels = torch.stack([lg.argmax(-1) for lg in logits], -1)  # (B, R, K+1)
    labels[..., 0] += 1  # r_loc is 1-based
    logps = [F.log_softmax(lg, -1) for lg in logits]
    right = labels[..., 0] == t.num_levels + 1  # (B, R)
    return Reflection(labels, logps, right, logps[0][..., t.num_levels]), after


def reflection_entropy(refl: Reflection) -> torch.Tensor:
    """Eq. 24: H_b = (1 / T_r) sum_t -sum_v p_t(v) log p_t(v), the mean entropy of the T_r = K+1
    reflection slots of each draft, (B, R); 0 for GC (no slots)."""
    if not refl.logps:
        return torch.zeros_like(refl.log_right)
    return torch.stack([-(lp.exp() * lp).sum(-1) for lp in refl.logps], -1).mean(-1)  # (B, R)


def correction_start_scores(draft_scores: torch.Tensor, refl: Reflection, entropy: torch.Tensor, alpha_e: float,
                            rank_rule: str) -> torch.Tensor:
    """Eq. 25: score_b^EGRS = score_b^base + alpha_e * H_b, the score the correction beams of draft b
    start from (draft_scores (B, R) -> (B, R)).

    joint | union: a draft the reflection judges correct starts at -inf, so it is kept as it is
    and not regenerated (Sec. 4.3). marginal: every draft is corrected, weighted by the
    probability that it is wrong, + log(1 - q_b) with q_b = p(r_loc = L+1 | b).
    """
    start = draft_scores + alpha_e * entropy  # (B, R) Eq. 25
    if rank_rule == "marginal":
        return start + torch.log1p(-refl.log_right.exp().clamp(max=1 - 1e-6))
    return start.masked_fill(refl.judged_correct, NEG_INF)


def correct(model: GRCModel, state: DecodeState, refl: Reflection, start: torch.Tensor, trie: PrefixTrie,
            width: int, exclude: torch.Tensor | None, prefix_values: list[torch.Tensor] | None = None,
            value_weight: float = 0.0) -> tuple[BeamResult, torch.Tensor]:
    """The correction pass (Sec. 4.1 template, Sec. 4.3 fixed beam budget): EOF2 + the reflection
    labels, then one constrained beam search whose start beams are the R reflected drafts at
    `start` (B, R) (Eq. 25), keeping the best `width` (B_cor) continuations over all drafts.

    `prefix_values`, `value_weight`: the collaborative prefix value the search prunes on (module docstring).
    Returns the corrections (B, B_cor) and the draft each descends from (B, B_cor), -1 padding.
    """
    t = model.template
    b, r = start.shape
    r_loc, r_sem = (refl.labels[..., 0], refl.labels[..., 1:]) if t.reflect else (None, None)
    hidden, keys, values = open_correction(model, state.memory, state.keys, state.values, r_loc, r_sem, (b, r))
    first_logp = F.log_softmax(model.seq.heads[0](hidden), -1)  # (B, R, V_0)
    stepper = _StartStepper(model.seq, first_logp, DecodeState(state.memory, keys, values, t.eof2 + 1))
    corrected, trace = beam_search(stepper, None, trie, width, initial_scores=start, return_trace=True,
                                   exclude=exclude, values=prefix_values, value_weight=value_weight)
    source = torch.full_like(corrected.items, -1)  # (B, B_cor)
    source[:, : trace.origin.shape[1]] = trace.origin
    return corrected, source.masked_fill(corrected.items < 0, -1)


def listed_drafts(drafts: BeamResult, refl: Reflection, rank_rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The drafts that enter the final ranking, and their merge scores, (B, W) each (-1 / -inf: not listed).

    joint: only the drafts judged correct, at their draft score; union: every draft, at its draft
    score; marginal: every draft, at score_b + log q_b (kept with probability q_b). Drafts beyond
    the reflection budget R are listed with their draft score under every rule.
    """
    b, w = drafts.items.shape
    r = refl.judged_correct.shape[1]
    listed = refl.judged_correct if rank_rule == "joint" else torch.ones_like(refl.judged_correct)  # (B, R)
    score = drafts.scores[:, :r] + refl.log_right if rank_rule == "marginal" else drafts.scores[:, :r]
    listed = torch.cat([listed, listed.new_ones(b, w - r)], 1)  # (B, W)
    score = torch.cat([score, drafts.scores[:, r:]], 1)
    return drafts.items.masked_fill(~listed, -1), score.masked_fill(~listed, NEG_INF)


def merge_by_rule(drafts: BeamResult, refl: Reflection, corrected: BeamResult, rank_rule: str, n_items: int,
                  width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 4, the merge (module docstring): the listed drafts and the corrections in one ranking,
    (B, W) items and scores. joint | union: the best score of each item; marginal: the log-sum-exp
    of its scores (the two-pass mixture)."""
    kept_items, kept_scores = listed_drafts(drafts, refl, rank_rule)  # (B, W)
    ranked = torch.cat([kept_items, corrected.items], 1)  # (B, W + B_cor)
    ranked_scores = torch.cat([kept_scores, corrected.scores], 1)
    if rank_rule == "marginal":
        ranked_scores = _sum_per_item(ranked, ranked_scores, n_items)
    return _merge(ranked, ranked_scores, width)


def verify_order(drafts: BeamResult, refl: Reflection, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """rank_rule "verify": the R reflected drafts re-ordered by score_b + gamma * log q_b, q_b =
    p(r_loc = L+1 | b), then the other drafts in draft order; (B, W) items and scores (the
    verify score for the first R, the draft score after). Padding drafts (-inf) stay last."""
    r = refl.log_right.shape[1]
    key = drafts.scores[:, :r] + gamma * refl.log_right.clamp_min(-1e4)  # (B, R) a sure "wrong" is finite
    key = key.masked_fill(drafts.items[:, :r] < 0, NEG_INF)
    order = key.sort(dim=1, descending=True, stable=True).indices  # (B, R)
    items = torch.cat([drafts.items[:, :r].gather(1, order), drafts.items[:, r:]], 1)  # (B, W)
    scores = torch.cat([key.gather(1, order), drafts.scores[:, r:]], 1)
    return items, scores


def backfill(items: torch.Tensor, scores: torch.Tensor, drafts: BeamResult, width: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill the padding of the merged list (B, W) with drafts not in it, in draft order (scores -inf),
    so that the list stays full when corrections and kept drafts are fewer than W."""
    missing = int((items < 0).sum(1).max()) if items.numel() else 0
    if missing == 0:
        return items, scores
    b = items.shape[0]
    present = (drafts.items[:, :, None] == items[:, None, :]).any(-1) | (drafts.items < 0)  # (B, W)
    fill_order = torch.where(present, width + torch.arange(width, device=items.device),
                             torch.arange(width, device=items.device)).sort(1).indices  # new drafts first
    fill = drafts.items.gather(1, fill_order).masked_fill(present.gather(1, fill_order), -1)  # (B, W)
    n_have = (items >= 0).sum(1, keepdim=True)  # (B, 1)
    slot = torch.arange(width, device=items.device).expand(b, width)
    take = (slot - n_have).clamp_min(0)  # (B, W) index into fill for padding slots
    out = torch.where(slot < n_have, items, fill.gather(1, take))
    return out, scores


def _merge(cand_items: torch.Tensor, cand_scores: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the best score of each distinct item (>= 0), best first, padded/truncated to width."""
    b, m = cand_items.shape
    order = cand_scores.sort(dim=1, descending=True, stable=True).indices  # (B, M)
    items = cand_items.gather(1, order)  # (B, M) in score order
    scores = cand_scores.gather(1, order)
    rank = torch.arange(m, device=items.device).expand(b, m)  # (B, M)
    key = items.clamp_min(0) * m + rank  # (B, M) sort by item, then by score order
    by_item = key.sort(dim=1).indices  # (B, M)
    sorted_items = items.gather(1, by_item)  # (B, M)
    first = torch.ones_like(sorted_items, dtype=torch.bool)
    first[:, 1:] = sorted_items[:, 1:] != sorted_items[:, :-1]
    keep = torch.zeros_like(first).scatter(1, by_item, first)  # (B, M) back in score order
    keep &= (items >= 0) & (scores > NEG_INF)
    pos = torch.where(keep, rank, m + rank).sort(dim=1).indices[:, :width]  # kept first, in score order
    out_items = items.gather(1, pos).masked_fill(~keep.gather(1, pos), -1)
    out_scores = scores.gather(1, pos).masked_fill(~keep.gather(1, pos), NEG_INF)
    if out_items.shape[1] < width:
        pad = width - out_items.shape[1]
        out_items = torch.cat([out_items, out_items.new_full((b, pad), -1)], 1)
        out_scores = torch.cat([out_scores, out_scores.new_full((b, pad), NEG_INF)], 1)
    return out_items, out_scores


def _sum_per_item(items: torch.Tensor, scores: torch.Tensor, n_items: int) -> torch.Tensor:
    """Each candidate's score replaced by the log-sum-exp of all candidate scores of its item (row-wise)."""
    b = items.shape[0]
    idx = torch.where(items >= 0, items, n_items)  # (B, M) padding -> spare column
    mx = torch.full((b, n_items + 1), NEG_INF, dtype=scores.dtype, device=scores.device)
    mx = mx.scatter_reduce(1, idx, scores, reduce="amax")  # (B, N+1)
    top = mx.gather(1, idx)  # (B, M)
    safe = torch.where(top > NEG_INF, top, torch.zeros_like(top))
    tot = torch.zeros_like(mx).scatter_add(1, idx, (scores - safe).exp())  # (B, N+1)
    return torch.where(top > NEG_INF, safe + tot.gather(1, idx).log(), top)


def _pad_beams(x: torch.Tensor, width: int) -> torch.Tensor:
    """(B, R, ...) -> (B, width, ...) with zeros for the drafts that were not reflected on."""
    short = width - x.shape[1]
    return torch.cat([x, x.new_zeros(x.shape[0], short, *x.shape[2:])], 1) if short > 0 else x


def _pad_log_right(refl: Reflection, width: int) -> torch.Tensor:
    """(B, R) -> (B, width), -inf for the drafts that were not reflected on."""
    lr = refl.log_right
    short = width - lr.shape[1]
    return torch.cat([lr, lr.new_full((lr.shape[0], short), NEG_INF)], 1) if short > 0 else lr


@torch.inference_mode()
def given_drafts(seq: Seq2Seq, batch: Batch, trie: PrefixTrie, items: torch.Tensor, width: int,
                 v_cf: list[torch.Tensor] | None = None, cf_weight: float = 0.0) -> tuple[BeamResult, BeamTrace]:
    """Step 1 from another decoder's candidates `items` (B, C) (-1 padding; e.g. VED's): the first
    `width`, each scored as the beam scores a draft, log pi(d) (+ cf_weight * log p_cf(d) from the last
    level of `v_cf`), best first, with the trace the reflection continues: the decoder cache of
    positions 0..L-1 (BOS, d_1..d_{L-1}) from one teacher-forced pass. Returns (B, width) drafts."""
    b, n_levels = items.shape[0], trie.num_levels
    items = items[:, :width]
    if items.shape[1] < width:
        items = torch.cat([items, items.new_full((b, width - items.shape[1]), -1)], 1)
    live = items >= 0  # (B, W)
    codes = trie.ids.to(items.device)[items.clamp_min(0)]  # (B, W, L) padding reads item 0's ID, scored -inf
    memory = seq.encode(batch)
    x = seq.embed_decoder_codes(codes[..., :-1])  # (B, W, L, D) BOS, d_1..d_{L-1}
    hidden, keys, values = decoder_step(seq, memory, [], [], x, 0, causal_mask(n_levels, x.device, x.dtype))
    logp = sum(F.log_softmax(seq.heads[level](hidden[:, :, level]), -1).gather(-1, codes[..., level:level + 1])[..., 0]
               for level in range(n_levels))  # (B, W) log pi(d)
    if v_cf is not None and cf_weight > 0:
        logp = logp + cf_weight * v_cf[-1].gather(1, items.clamp_min(0))
    scores, order = logp.masked_fill(~live, NEG_INF).sort(dim=1, descending=True, stable=True)  # (B, W)
    items = items.gather(1, order)
    codes = codes.gather(1, order[..., None].expand_as(codes)).masked_fill((items < 0)[..., None], -1)
    items = items.masked_fill(~torch.isfinite(scores), -1)
    idx = order[:, :, None, None, None]  # (B, W, 1, 1, 1)
    keys = [k.gather(1, idx.expand_as(k)) for k in keys]  # per layer (B, W, H, L, dh)
    values = [v.gather(1, idx.expand_as(v)) for v in values]
    rows = torch.arange(width, device=items.device).expand(b, width)
    trace = BeamTrace(DecodeState(memory, keys, values, n_levels), rows, torch.zeros_like(rows))
    return BeamResult(items, scores, codes), trace


@torch.inference_mode()
def grc_decode(model: GRCModel, batch: Batch, trie: PrefixTrie, cfg: DecodeConfig,
               exclude: torch.Tensor | None = None, item_logp: torch.Tensor | None = None,
               draft_items: torch.Tensor | None = None) -> GRCResult:
    """Two-pass GRC inference with EGRS for B users (Sec. 4.3; module docstring, steps 1-4).

    `exclude` (B, N) bool: items neither pass may return (e.g. the user's history).
    `item_logp` (B, N): a collaborative model's item log-probabilities, read when cfg.cf_weight > 0.
    `draft_items` (B, C): the drafts, drawn by another decoder (cfg.draft_ved), instead of the beam.
    """
    if (cfg.draft_ved is not None) != (draft_items is not None):
        raise ValueError("grc_decode: draft_items are given exactly when cfg.draft_ved is set "
                         "(grc_core.evaluation.rank_with_grc draws them)")
    v_cf = None
    if cfg.cf_weight > 0:
        if item_logp is None:
            raise ValueError("grc_decode: cf_weight > 0 needs the collaborative model's item_logp")
        v_cf = prefix_values(item_logp, item_prefix_nodes(trie), trie, exclude)  # per level (B, M_l)
    if draft_items is None:
        drafts, trace = beam_search(BackboneStepper(model.seq), batch, trie, cfg.width, return_trace=True,
                                    exclude=exclude, values=v_cf, value_weight=cfg.cf_weight)  # 1. B drafts, (B, W)
    else:
        drafts, trace = given_drafts(model.seq, batch, trie, draft_items, cfg.width, v_cf, cfg.cf_weight)
    refl, state = reflect(model, drafts, trace, cfg.reflect_width)  # 2. reflection of the best R
    entropy = reflection_entropy(refl)  # (B, R) Eq. 24
    r = entropy.shape[1]
    if cfg.rank_rule == "verify":  # the reflection as a verifier: re-order, no correction pass
        items, scores = verify_order(drafts, refl, cfg.verify_gamma)
        none = BeamResult(items.new_full((items.shape[0], 0), -1), scores.new_zeros(items.shape[0], 0),
                          drafts.codes[:, :0])
        return GRCResult(items, scores, drafts, _pad_beams(refl.labels, cfg.width), _pad_beams(entropy, cfg.width),
                         none, items.new_full((items.shape[0], 0), -1), _pad_log_right(refl, cfg.width))
    start = correction_start_scores(drafts.scores[:, :r], refl, entropy, cfg.alpha_e, cfg.rank_rule)  # Eq. 25
    corrected, source = correct(model, state, refl, start, trie, cfg.correct_width or cfg.width, exclude,
                                v_cf, cfg.cf_weight)  # 3.
    items, scores = merge_by_rule(drafts, refl, corrected, cfg.rank_rule, trie.ids.shape[0], cfg.width)  # 4.
    items, scores = backfill(items, scores, drafts, cfg.width)
    return GRCResult(items, scores, drafts, _pad_beams(refl.labels, cfg.width), _pad_beams(entropy, cfg.width),
                     corrected, source, _pad_log_right(refl, cfg.width))
