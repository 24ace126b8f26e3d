"""Decoding speed: Hugging Face `generate` against `grc_core.beam_search` on the same T5 weights.

    python -m benchmarks.decode_speed --beams 20 200 --users 512 [--threads 2]

Model: a paper-size T5ForConditionalGeneration (d_model 128, d_kv 32, 4 heads, d_ff 640, 1 encoder
and 2 decoder layers, ReLU, tied embeddings, 0.95M parameters), random weights from `--seed`.
Catalog: the prebuilt Instruments IDs (4 levels x 256 codes) plus TIGER's disambiguation level
(`semantic_ids.disambiguate`: 48 items share 23 IDs, so a 5th level of 3 codes); L = 5 and every
item keeps a unique ID. Users: random histories of 20 distinct items, as their 5 tokens each plus
EOS (101 encoder tokens, no padding).

Both paths run the same constrained search: HF with `prefix_allowed_tokens_fn` (a dict lookup),
summed log-probs (`length_penalty=0.0`, `early_stopping="never"`, EOS never allowed,
`max_new_tokens=L`); ours with `T5StepModel`, which reads HF's weights and runs its own encoder
and cached decoder step:
- cross-attention K/V are computed once per user and shared by all its beams: the beams are the
  query axis of one attention call per user and head, nothing is expanded or copied;
- decoder self-attention keeps a KV cache per layer, (t, B*W, 2*H*dk) position-major, so the
  gather by `parents` writes straight into the new cache;
- a first layer's QKV depends on the token alone, so it is a table lookup (encoder and decoder);
- linears run on oneDNN's fused kernel (ReLU and residual add fused), QKV fused into one GEMM;
- the trie mask is a gather inside `beam_search`; torch.inference_mode; `--threads` threads.
Log-probs are normalised over the whole T5 vocabulary in both paths, as `generate` does; the
adapter's teacher-forced log-probs are checked against HF's forward (`adapter_check`).

Each configuration (path, beam, batch size) runs in its own subprocess so that its peak RSS
(`resource.getrusage` ru_maxrss, including about 430 MiB of Python, torch and the model) is its
own. HF decodes `--hf-users` distinct users per batch size (8, 16, 32; at least one batch); all of them are parity
users, compared with our top-B lists for the same users. Our path decodes `--users` users per
configuration. users/s counts decoding only (after setup and one warm-up batch) and includes the
encoder; users_per_cpu_s divides by the process's CPU time, which other jobs on the machine
disturb less than wall time (with 1 thread; with 2 it counts spin-waiting too).

Where the time goes: both paths do the same FLOPs per beam and level (about 0.7M multiply-adds;
ours skips the W-1 dead start beams and the first-layer QKV). At beam 200 that is about 1.1 GFLOP
per user; ours runs at roughly half the machine's fp32 GEMM peak, so the ratio to HF is bounded by
how slow HF's per-step overhead is. At beam 20 the encoder is a third of the work and HF's
overhead a smaller share, so the ratio is lower.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grc_core.beam_search import beam_search
from grc_core.semantic_ids import disambiguate, parse_prebuilt_codes
from grc_core.trie import PrefixTrie

CATALOG = "/work/shared/datasets/instruments/Instruments.index.qwen3-rq4x256.json"
RESULTS = Path(__file__).resolve().parent / "results" / "decode_speed.json"
PAD, EOS = 0, 1  # T5: pad doubles as the decoder start token
SPECIALS = 2
HISTORY = 20


def load_catalog(path: str, codebook: int) -> tuple[np.ndarray, list[int]]:
    """Item IDs (N, L+1) with TIGER's disambiguation level, and the level sizes."""
    with open(path, encoding="utf-8") as f:
        index = json.load(f)
    rows = [index[k] for k in sorted(index, key=int)]
    codes = parse_prebuilt_codes(rows)  # (N, 4)
    if codes.max() >= codebook:
        raise ValueError(f"load_catalog: code {codes.max()} >= codebook {codebook} in {path}")
    ids, extra = disambiguate(codes)  # (N, 5)
    return ids, [codebook] * codes.shape[1] + ([extra] if extra else [])


def token_offsets(level_sizes: list[int]) -> list[int]:
    """T5 token id of code 0 at each level: specials first, then the levels in order."""
    return [SPECIALS + int(s) for s in np.cumsum([0, *level_sizes[:-1]])]


def build_model(level_sizes: list[int], seed: int):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=SPECIALS + sum(level_sizes), d_model=128, d_kv=32, d_ff=640, num_layers=1,
        num_decoder_layers=2, num_heads=4, feed_forward_proj="relu", dropout_rate=0.0,
        pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD,
    )
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config).eval()


def encoder_inputs(ids: np.ndarray, level_sizes: list[int], users: int, seed: int) -> torch.Tensor:
    """Random histories of HISTORY distinct items as encoder tokens (U, HISTORY * L + 1)."""
    rng = np.random.default_rng(seed)
    history = np.stack([rng.choice(len(ids), HISTORY, replace=False) for _ in range(users)])  # (U, 20)
    tokens = ids[history] + np.asarray(token_offsets(level_sizes))  # (U, 20, L)
    tokens = tokens.reshape(users, -1)  # (U, 20 L)
    return torch.from_numpy(np.concatenate([tokens, np.full((users, 1), EOS)], axis=1))  # (U, 20 L + 1)


@dataclass
class T5State:
    cross: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: K, V (B, H, T, dk), once per user
    self_kv: list[torch.Tensor]  # per layer: K and V (t, B*W, 2*H*dk), position-major
    beams: int  # W of the beams this state holds


def _rms(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.nn.functional.rms_norm(h, weight.shape, weight, eps)  # T5LayerNorm, one kernel


def _has_onednn_linear() -> bool:
    try:
        x = torch.ones(2, 3)
        return bool(torch.ops.mkldnn._linear_pointwise(x, torch.ones(4, 3), None, "relu", [], "").eq(3).all())
    except (AttributeError, RuntimeError):
        return False


# oneDNN's fused linear (the kernel torch.compile uses on CPU): ~1.3x MKL's fp32 GEMM on this AMD
# CPU, and it fuses the ReLU and the residual add, saving a pass over (N, d_ff) and (N, D).
_ONEDNN = _has_onednn_linear()


def _linear(x: torch.Tensor, weight: torch.Tensor, relu: bool = False, add: torch.Tensor | None = None) -> torch.Tensor:
    """x (N, in) @ weight (out, in).T, then ReLU or + add."""
    if _ONEDNN:
        if add is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, add, weight, None, "add")
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "relu" if relu else "none", [], "")
    y = torch.nn.functional.linear(x, weight)
    return torch.relu_(y) if relu else y if add is None else y.add_(add)


class T5StepModel:
    """`StepModel` over a HF T5ForConditionalGeneration's weights: our encoder and cached decoder step.

    batch: encoder token ids (B, T) without padding. Level l's log-probs are the slice of
    log_softmax over the whole vocabulary that holds level l's tokens.
    """

    def __init__(self, model, level_sizes: list[int]):
        cfg = model.config
        if cfg.feed_forward_proj != "relu" or cfg.num_heads * cfg.d_kv != cfg.d_model:
            raise ValueError("T5StepModel: written for ReLU feed-forward and num_heads * d_kv == d_model")
        self.model, self.heads, self.dk, self.eps = model, cfg.num_heads, cfg.d_kv, cfg.layer_norm_epsilon
        self.offsets = token_offsets(level_sizes)
        self.sizes = list(level_sizes)
        self.embed = model.shared.weight.detach()  # (V, D)
        self.encoder_layers = [self._weights(block, cross=False) for block in model.encoder.block]
        self.ln_encoder = model.encoder.final_layer_norm.weight.detach()
        self.layers = [self._weights(block, cross=True) for block in model.decoder.block]
        scale = cfg.d_model**-0.5 if getattr(cfg, "scale_decoder_outputs", cfg.tie_word_embeddings) else 1.0
        self.ln_final_scaled = model.decoder.final_layer_norm.weight.detach() * scale  # norm, weight and scale in one kernel
        self.lm_head = model.lm_head.weight.detach().contiguous()  # (V, D)
        positions = len(level_sizes) + 1
        with torch.no_grad():
            bias = model.decoder.block[0].layer[0].SelfAttention.compute_bias(positions, positions)  # (1, H, P, P)
        # Query at decoder position p over keys 0..p, laid out (p+1, 1, H) to broadcast over (t+1, N, H).
        self.pos_bias = [bias[0, :, p, : p + 1].T.reshape(p + 1, 1, self.heads).contiguous() for p in range(positions)]
        self.encoder_bias: dict[int, torch.Tensor] = {}  # history length T -> (1, H, T, T)
        # A first layer's QKV depends on the token alone: one row per vocabulary token, then a gather.
        self.encoder_token_qkv = self._token_qkv(self.encoder_layers[0])  # (V, 3 H dk)
        self.decoder_token_qkv = self._token_qkv(self.layers[0])

    def _token_qkv(self, layer: dict[str, torch.Tensor]) -> torch.Tensor:
        return _linear(_rms(self.embed, layer["ln_self"], self.eps), layer["qkv"])

    @staticmethod
    def _weights(block, cross: bool) -> dict[str, torch.Tensor]:
        sa, ff = block.layer[0].SelfAttention, block.layer[-1].DenseReluDense
        w = dict(
            ln_self=block.layer[0].layer_norm.weight,
            qkv=torch.cat([sa.q.weight, sa.k.weight, sa.v.weight]),  # (3 H dk, D)
            o_self=sa.o.weight,  # (D, H dk)
            ln_ff=block.layer[-1].layer_norm.weight,
            wi=ff.wi.weight,  # (d_ff, D)
            wo=ff.wo.weight,  # (D, d_ff)
        )
        if cross:
            ca = block.layer[1].EncDecAttention
            w.update(
                ln_cross=block.layer[1].layer_norm.weight,
                q_cross=ca.q.weight,  # (H dk, D)
                kv_cross=torch.cat([ca.k.weight, ca.v.weight]),  # (2 H dk, D)
                o_cross=ca.o.weight,
            )
        return {k: v.detach().contiguous() for k, v in w.items()}

    def _encode(self, batch: torch.Tensor) -> torch.Tensor:
        """HF's T5 encoder (no padding) on fused kernels: (B, T) -> (B*T, D)."""
        b, t = batch.shape
        if t not in self.encoder_bias:
            with torch.no_grad():
                self.encoder_bias[t] = self.model.encoder.block[0].layer[0].SelfAttention.compute_bias(t, t).contiguous()
        h = self.embed[batch.reshape(-1)]  # (B T, D)
        for i, layer in enumerate(self.encoder_layers):
            if i == 0:
                qkv = self.encoder_token_qkv[batch.reshape(-1)]  # (B T, 3 H dk)
            else:
                qkv = _linear(_rms(h, layer["ln_self"], self.eps), layer["qkv"])
            q, k, v = qkv.view(b, t, 3, self.heads, self.dk).permute(2, 0, 3, 1, 4)  # (B, H, T, dk) each
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.encoder_bias[t], scale=1.0)
            h = _linear(out.transpose(1, 2).reshape(b * t, -1), layer["o_self"], add=h)
            h = _linear(_linear(_rms(h, layer["ln_ff"], self.eps), layer["wi"], relu=True), layer["wo"], add=h)
        return _rms(h, self.ln_encoder, self.eps)

    def begin(self, batch: torch.Tensor) -> tuple[torch.Tensor, T5State]:
        b, hk = batch.shape[0], self.heads * self.dk
        enc = self._encode(batch)  # (B T, D)
        cross = []
        for layer in self.layers:
            kv = _linear(enc, layer["kv_cross"]).view(b, -1, 2, self.heads, self.dk)  # (B, T, 2, H, dk)
            cross.append((kv[:, :, 0].transpose(1, 2).contiguous(), kv[:, :, 1].transpose(1, 2).contiguous()))  # (B, H, T, dk) x2
        start = torch.full((b, 1), PAD, dtype=torch.long)  # (B, 1)
        empty = [enc.new_empty(0, b, 2 * hk)] * len(self.layers)  # (t=0, B*1, 2 H dk)
        logp, self_kv = self._step(start, cross, empty, None, 0)
        return logp, T5State(cross, self_kv, 1)

    def advance(self, state: T5State, parents: torch.Tensor, tokens: torch.Tensor, level: int):
        b, w = parents.shape
        rows = (parents + torch.arange(b)[:, None] * state.beams).view(-1)  # (B*W,) into the previous B*W'
        logp, self_kv = self._step(tokens + self.offsets[level], state.cross, state.self_kv, rows, level + 1)
        return logp, T5State(state.cross, self_kv, w)

    def _step(self, tokens: torch.Tensor, cross, cache, rows: torch.Tensor | None, level: int):
        """One decoder token per beam (vocabulary ids (B, W)): level log-probs (B, W, V_l) and the new cache.

        The token sits at decoder position `level` (the start token at 0). cache: per layer
        (t, N', 2 H dk), keys and values of positions 0..t-1 of the previous beams, position-major so
        that the gather by `rows` (N,) writes straight into the first t slots of the new cache.
        """
        pos = level
        b, w = tokens.shape
        n, hk = b * w, self.heads * self.dk
        h = self.embed[tokens.reshape(-1)]  # (N, D)
        new_cache = []
        for i, (layer, (k_x, v_x), kv) in enumerate(zip(self.layers, cross, cache)):
            if i == 0:
                qkv = self.decoder_token_qkv[tokens.reshape(-1)]  # (N, 3 H dk)
            else:
                qkv = _linear(_rms(h, layer["ln_self"], self.eps), layer["qkv"])
            new = qkv.new_empty(pos + 1, n, 2 * hk)  # (t+1, N, 2 H dk)
            if pos:
                torch.index_select(kv, 1, rows, out=new[:pos])
            new[pos] = qkv[:, hk:]
            kv = new
            new_cache.append(kv)
            # At most L+1 keys per beam: a loop over positions keeps the temporaries at (N, H, dk).
            q = qkv[:, :hk].view(n, self.heads, self.dk)
            att = torch.stack([(kv[j, :, :hk].view(n, self.heads, self.dk) * q).sum(-1) for j in range(pos + 1)])
            att = torch.softmax(att + self.pos_bias[pos], dim=0)[..., None]  # (t+1, N, H, 1)
            out = att[0] * kv[0, :, hk:].view(n, self.heads, self.dk)  # (N, H, dk)
            for j in range(1, pos + 1):
                out.addcmul_(att[j], kv[j, :, hk:].view(n, self.heads, self.dk))
            out = out.view(n, hk)
            h = _linear(out, layer["o_self"], add=h)

            q = _linear(_rms(h, layer["ln_cross"], self.eps), layer["q_cross"]).view(b, w, self.heads, self.dk)
            # The W beams of a user are the query axis against its encoder K/V: shared, not expanded.
            out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k_x, v_x, scale=1.0)  # (B, H, W, dk)
            h = _linear(out.transpose(1, 2).reshape(n, hk), layer["o_cross"], add=h)

            h = _linear(_linear(_rms(h, layer["ln_ff"], self.eps), layer["wi"], relu=True), layer["wo"], add=h)
        logits = _linear(_rms(h, self.ln_final_scaled, self.eps), self.lm_head)  # (N, V)
        lo = self.offsets[level]
        logp = torch.log_softmax(logits, dim=-1)[:, lo: lo + self.sizes[level]]  # (N, V_l), normalised over all V
        return logp.view(b, w, -1), new_cache


def adapter_check(model, steps: T5StepModel, ids: np.ndarray, enc: torch.Tensor, items: list[int]) -> float:
    """Largest |log-prob| difference between the adapter, teacher-forced on `items`, and HF's forward."""
    length, offsets = ids.shape[1], np.asarray(steps.offsets)
    chosen = torch.from_numpy(ids[items])  # (K, L)
    decoder_in = torch.cat([torch.full((len(items), 1), PAD), chosen + torch.from_numpy(offsets)], dim=1)  # (K, L+1)
    worst = 0.0
    with torch.inference_mode():
        for user in range(len(enc)):
            ref = torch.log_softmax(model(input_ids=enc[user:user + 1].expand(len(items), -1),
                                          decoder_input_ids=decoder_in).logits, dim=-1)  # (K, L+1, V)
            logp, state = steps.begin(enc[user:user + 1])  # (1, 1, V_0)
            parents = torch.zeros(1, len(items), dtype=torch.long)
            for level in range(length):
                if level:
                    logp, state = steps.advance(state, parents, chosen[None, :, level - 1], level - 1)
                    parents = torch.arange(len(items))[None]
                want = ref[:, level, offsets[level]: offsets[level] + steps.sizes[level]]  # (K, V_l)
                worst = max(worst, float((logp[0] - want).abs().max()))
    return worst


def allowed_tokens(ids: np.ndarray, level_sizes: list[int]) -> dict[tuple[int, ...], list[int]]:
    """HF constraint: generated token prefix -> allowed next tokens."""
    tokens = ids + np.asarray(token_offsets(level_sizes))  # (N, L)
    table: dict[tuple[int, ...], set[int]] = {}
    for row in tokens.tolist():
        for level in range(len(row)):
            table.setdefault(tuple(row[:level]), set()).add(row[level])
    return {k: sorted(v) for k, v in table.items()}


def hf_decode(model, enc: torch.Tensor, allowed, beams: int, length: int):
    """HF generate on one batch: token ids (B, W, L) and sequence scores (B, W), best first."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    out = model.generate(
        input_ids=enc, attention_mask=torch.ones_like(enc), num_beams=beams, num_return_sequences=beams,
        do_sample=False, length_penalty=0.0, early_stopping="never", max_new_tokens=length,
        prefix_allowed_tokens_fn=lambda _, prefix: allowed[tuple(prefix[1:].tolist())],
        # 1 encoder vs 2 decoder layers: a cache sized from the config fails (STACK.md).
        past_key_values=EncoderDecoderCache(DynamicCache(), DynamicCache()),
        return_dict_in_generate=True, output_scores=True,
    )
    b = enc.shape[0]
    return out.sequences[:, 1:].view(b, beams, length), out.sequences_scores.view(b, beams)


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Decode `job["users"]` users in batches with one path; save their top-B lists."""
    torch.set_num_threads(job["threads"])
    ids, sizes = load_catalog(job["catalog"], job["codebook"])
    trie = PrefixTrie.from_ids(ids, sizes)
    model = build_model(sizes, job["seed"])
    if job.get("dtype", "float32") != "float32":
        model = model.to(getattr(torch, job["dtype"]))  # HF only: `generate` in bf16 on the CPU
    enc_all = encoder_inputs(ids, sizes, job["first_user"] + job["users"], job["seed"])
    enc_all = enc_all[job["first_user"]:]  # (U, T)
    beams, batch, length = job["beam"], job["batch"], len(sizes)
    if job["path"] == "hf":
        allowed = allowed_tokens(ids, sizes)
        offsets = torch.tensor(token_offsets(sizes))

        def decode(enc):
            tokens, scores = hf_decode(model, enc, allowed, beams, length)
            codes = tokens - offsets  # (B, W, L)
            nodes = torch.zeros(codes.shape[:2], dtype=torch.long)
            for level in range(length):
                nodes = trie.next_nodes(level, nodes, codes[..., level])
            return nodes, scores
    else:
        steps = T5StepModel(model, sizes)

        def decode(enc):
            out = beam_search(steps, enc, trie, beams)
            return out.items, out.scores
    rss_setup = maxrss_mib()
    with torch.inference_mode():
        decode(enc_all[:batch])  # warm-up, untimed
        items, scores = [], []
        start, cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(enc_all), batch):
            got = decode(enc_all[i: i + batch])
            items.append(got[0])
            scores.append(got[1])
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    np.savez(job["save"], items=torch.cat(items).numpy(), scores=torch.cat(scores).float().numpy())
    return dict(path=job["path"], dtype=job.get("dtype", "float32"), beam=beams, batch=batch, threads=job["threads"], users=len(enc_all),
                first_user=job["first_user"], seconds=round(seconds, 3), users_per_s=round(len(enc_all) / seconds, 2),
                users_per_cpu_s=round(len(enc_all) / cpu_seconds, 2),
                peak_rss_mib=round(maxrss_mib(), 1), setup_rss_mib=round(rss_setup, 1))


def spawn(job: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "benchmarks.decode_speed", "--worker", json.dumps(job)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        raise RuntimeError(f"worker {job['path']} beam {job['beam']} batch {job['batch']} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(result), flush=True)
    return result


def parity(hf: dict[str, np.ndarray], ours: dict[str, np.ndarray]) -> dict[str, Any]:
    """Compare HF's top-B lists (users 0..n-1) with ours on the same users."""
    n = len(hf["items"])
    a, b = hf["items"], ours["items"][:n]
    same_set = np.array([set(x) == set(y) for x, y in zip(a, b)])
    same_order = (a == b).all(axis=1)
    diffs = []
    for u in np.flatnonzero(~same_order):
        pos = int(np.flatnonzero(a[u] != b[u])[0])
        s = ours["scores"][u]
        diffs.append(dict(user=int(u), first_position=pos, hf_item=int(a[u, pos]), our_item=int(b[u, pos]),
                          our_gap_to_next=float(s[pos] - s[min(pos + 1, len(s) - 1)]),
                          hf_minus_our_score=float(hf["scores"][u, pos] - s[pos])))
    return dict(users=n, identical_set_share=float(same_set.mean()), identical_order_share=float(same_order.mean()),
                max_abs_score_diff_where_same_order=float(np.abs(hf["scores"] - ours["scores"][:n])[same_order].max())
                if same_order.any() else None,
                invalid_items_hf=int((a < 0).sum()), invalid_items_ours=int((b < 0).sum()), differences=diffs[:10])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--beams", type=int, nargs="+", default=[20, 200])
    p.add_argument("--users", type=int, default=512, help="users our path decodes per configuration")
    p.add_argument("--hf-users", type=int, default=16,
                   help="distinct users HF decodes per batch size (at least one batch); all are parity users")
    p.add_argument("--hf-batches", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--hf-dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                   help="dtypes HF decodes in; its best over all of them is the baseline, and parity is "
                        "checked on the float32 runs (ours always decodes in float32)")
    p.add_argument("--our-batches", type=int, nargs="+", default=None,
                   help="batch sizes for our path (default: 128 x threads users at beam <= 64, else 32)")
    p.add_argument("--threads", type=int, default=2, help="torch threads, both paths")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--codebook", type=int, default=256)
    p.add_argument("--catalog", default=CATALOG)
    p.add_argument("--out", default=str(RESULTS), help="JSON file; runs with other --threads in it are kept")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return
    base = dict(catalog=args.catalog, codebook=args.codebook, seed=args.seed, threads=args.threads)
    ids, sizes = load_catalog(args.catalog, args.codebook)
    model = build_model(sizes, args.seed)
    check = adapter_check(model, T5StepModel(model, sizes), ids, encoder_inputs(ids, sizes, 4, args.seed),
                          [0, 77, 5000, len(ids) - 1])
    report: dict[str, Any] = dict(
        command="python -m benchmarks.decode_speed " + " ".join(sys.argv[1:] if argv is None else argv),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=dict(platform=platform.platform(), processor=platform.processor() or None, cpu_count=os.cpu_count(),
                     load_average_at_start=[round(x, 2) for x in os.getloadavg()]),
        torch=torch.__version__, transformers=__import__("transformers").__version__, onednn_linear=_ONEDNN,
        settings=dict({k: v for k, v in vars(args).items() if k != "worker"}, history_items=HISTORY,
                      model="T5 d_model 128, d_kv 32, 4 heads, d_ff 640, 1 encoder + 2 decoder layers, ReLU, tied"),
        catalog=dict(items=len(ids), level_sizes=sizes,
                     trie_mib=round(PrefixTrie.from_ids(ids, sizes).nbytes / 2**20, 1)),
        adapter_check=dict(max_abs_logp_diff_vs_hf_forward=check, users=4, items=4),
        beams={},
    )
    with tempfile.TemporaryDirectory() as tmp:
        for beam in args.beams:
            runs, hf_parts = [], {}
            for dtype in args.hf_dtypes:
                first, hf_parts[dtype] = 0, []
                for batch in args.hf_batches:  # every dtype decodes the same users
                    users = max(args.hf_users, batch)
                    job = dict(base, path="hf", dtype=dtype, beam=beam, batch=batch, users=users, first_user=first,
                               save=f"{tmp}/hf_{dtype}_{beam}_{batch}.npz")
                    runs.append(spawn(job))
                    hf_parts[dtype].append(np.load(job["save"]))
                    first += users
            our_saves = {}
            for batch in args.our_batches or [128 * args.threads if beam <= 64 else 32]:
                job = dict(base, path="ours", beam=beam, batch=batch, users=max(args.users, first), first_user=0,
                           save=f"{tmp}/ours_{beam}_{batch}.npz")
                runs.append(spawn(job))
                our_saves[batch] = job["save"]
            best_hf = max((r for r in runs if r["path"] == "hf"), key=lambda r: r["users_per_s"])
            best_ours = max((r for r in runs if r["path"] == "ours"), key=lambda r: r["users_per_s"])
            ours = np.load(our_saves[best_ours["batch"]])
            ours = {k: ours[k] for k in ("items", "scores")}
            checks = {dtype: parity({k: np.concatenate([part[k] for part in parts]) for k in ("items", "scores")}, ours)
                      for dtype, parts in hf_parts.items()}
            entry = dict(hf_best=best_hf, ours_best=best_ours,
                         speedup=round(best_ours["users_per_s"] / best_hf["users_per_s"], 1),
                         speedup_cpu_time=round(best_ours["users_per_cpu_s"] / best_hf["users_per_cpu_s"], 1))
            if len(hf_parts) > 1:
                for dtype in hf_parts:
                    best = max((r for r in runs if r["path"] == "hf" and r["dtype"] == dtype), key=lambda r: r["users_per_s"])
                    entry[f"speedup_vs_hf_{dtype}"] = round(best_ours["users_per_s"] / best["users_per_s"], 1)
            entry["parity"] = checks.get("float32")
            entry.update({f"agreement_hf_{dtype}": checks[dtype] for dtype in hf_parts if dtype != "float32"})
            entry["runs"] = runs
            report["beams"][str(beam)] = entry
            print(json.dumps(dict(beam=beam, **{k: v for k, v in entry.items() if k != "runs" and "parity" not in k
                                                and not k.startswith("agreement")})), flush=True)
            for dtype, check in checks.items():
                print(dtype, json.dumps({k: v for k, v in check.items() if k != "differences"}), flush=True)
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    out = Path(args.out)
    merged = json.loads(out.read_text(encoding="utf-8")) if out.exists() else {}
    merged[f"threads_{args.threads}"] = report
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out} [threads_{args.threads}]")


if __name__ == "__main__":
    main()
