#!/usr/bin/env python3
"""GPU check: armorm against transformers on a random ArmoRM of the real 8B shape (issue 10).

Run by scripts/gpu-check.sh on the device machine (torch and transformers there, no internet, no Rust).
It generates random bf16 weights of ArmoRM-Llama3-8B's shape on the GPU and then, phase by phase:

  compile  the first armorm run against a fresh CUDA JIT cache, then a second one on the filled cache:
           the difference is the PTX compile a fresh node pays (a warm-up run happens even when skipped,
           so that no timing below includes it);
  short    armorm bf16 on 1,024 rows of ~265 tokens (the issue's first case), with --attention flash
           (the default of these runs; --attention blocked or auto for a build without flash-attn);
  long     armorm bf16 on 32 rows of 3,000-6,200 tokens (the issue's second case);
  profile  one more armorm run of each case with ARMORM_PROFILE=1: where the time goes; then the same
           with each ARMORM_FUSED_OPS value of --profile-fused (default vector,qkv,gateup,accumulate, and
           the same under --attention flash3: the sections that perf-notes 15-17 predict they shorten);
  flash3   armorm bf16 on both cases with --attention flash3 (FlashAttention-3, Hopper's wgmma and TMA,
           in place of FlashAttention-2; perf-notes 17 predicts 0-3% short, +6-8% long): its gain,
           score difference and Pearson figure;
  flash3-all armorm bf16 on both cases with --attention flash3 and
           ARMORM_FUSED_OPS=vector,qkv,gateup,accumulate: everything built, together;
  parity   armorm f32 against transformers f32 on a few short and a few long rows, and transformers f32
           on the accuracy rows (for the Pearson figures);
  sweep    transformers bf16 (sdpa, sorted padded batches) at several batch sizes on both cases: armorm is
           compared against the fastest;
  vector   armorm bf16 on both cases with ARMORM_FUSED_OPS=vector (the fused ops' kernels on 16-byte loads
           and stores; perf-notes 15 predicts +8-9% short, +7-8% long): its gain, score difference and
           Pearson figure;
  qkv      armorm bf16 on both cases with ARMORM_FUSED_OPS=vector,qkv (the vector kernels, and each layer's
           q/k/v as one GEMM with RoPE in place on its output, handed to flash attention as views;
           perf-notes 16 predicts +2-2.6% over vector alone): its gain, score difference and Pearson figure;
  gateup   armorm bf16 on both cases with ARMORM_FUSED_OPS=vector,qkv,gateup (gate/up as one GEMM, SiLU·mul
           from its halves; perf-notes 16 predicts +0.5-1.5% over vector,qkv);
  accumulate armorm bf16 on both cases with ARMORM_FUSED_OPS=vector,qkv,gateup,accumulate (o_proj and
           down_proj adding into the f32 residual stream in their cuBLAS GEMMs, no separate residual add;
           perf-notes 16 predicts +1-2.7% over vector,qkv,gateup);
  pool     armorm bf16 on both cases with ARMORM_KEEP_FREED=0 (freed memory handed back to the driver at
           every synchronization, candle's default): what keeping it in the pool gains;
  fused    armorm bf16 on both cases with ARMORM_FUSED_OPS=0 (armorm's fused SiLU·mul, residual add and
           RMSNorm kernels are the default on CUDA since the first H200 check): their gain and the
           largest score difference;
  gemm     torch's F.linear on the projections' shapes at 65,536 tokens: the rate cuBLAS gives them on
           this card, beside armorm's profile; and torch's own FlashAttention-2 varlen forward on both
           sets' rows in armorm's batches (one layer, the time for all layers beside armorm's
           varlen_attn section: is flash on short rows slow in the kernel family or in armorm's build?),
           and torch's cuDNN attention (Hopper-native kernels) on the long rows, a yardstick for flash3;
  residual armorm bf16 on both cases with ARMORM_BF16_RESIDUAL=1 (the residual stream in bf16, as
           transformers keeps it, instead of f32; issue 10 step 3 "measure both"): its gain, the largest
           score difference and its own Pearson figure against transformers-f32;
  blocked  armorm bf16 with --attention blocked (the padded matmul attention from before flash attention)
           on both cases: flash attention's gain on the same card in the same run, and the largest score
           difference between the two;
  best-of-8 (opt-in, --best-of-8) 64 prompts of ~500 tokens with 8 answers of ~150 each, rows shuffled
           (the set of scripts/bench.py): armorm with prefix sharing (issue 12) against armorm with
           --prefix-sharing off (goal >= 2.5x) and transformers' sorted batches; scores compared.

Seconds per phase measured on an H200 (two runs, 2026-11-28, scripts/perf-notes.md 15): setup 31 (16 GB
of weights written; tokenization), compile 24, short 10, long 8, profile 10 with 256/8 rows (~20 with the
whole sets, the default now; ~60 with --profile-fused's two variants), flash3, flash3-all, vector, qkv,
gateup and accumulate ~20 each (predicted, like fused), pool 18, fused 20, gemm 1 (~8 with torch's flash on both sets and cuDNN on the long rows, predicted), armorm f32 13, transformers bf16 73 (load, 3 short
and 3 long batch sizes; ~95 with the default 4 and 4), transformers f32 24, residual 19, blocked 44,
best-of-8 32: about 530 s with every phase, more than a lease allows (the runbook of perf-notes 17 skips
residual, blocked, pool and fused: ~393 s). They run in this order: armorm's own runs, then armorm f32 and
the transformers f32 reference (parity and every Pearson figure), then the transformers bf16 sweep (which
drops its own largest batch sizes when time runs short; the model loads in the f32 phase now, so the
load's ~15 s moves there), then the torch diagnostics (gemm: private attention ops, run last so that a
fault in them cannot take the transformers phases with it), then residual and blocked. Phases not started
by --time-limit (400 s) are skipped, so the summary always prints; the JSON is rewritten after every
phase, and on SIGTERM.

Each armorm run is killed after --run-timeout (120 s; --flash3-timeout, 60 s, for flash3 runs): a kernel
that hangs costs that phase, not the lease. After one flash3 run fails or times out, the remaining flash3
runs are skipped.

It ends with a one-screen summary (tokens/s, MFU of 989 TFLOP/s, ratios, Pearson figures side by side,
the profile, the issue's goals) and writes every number to a JSON file. MFU counts the FLOPs a score
requires (causal attention; the last layer only at the two positions read, with its keys and values for
every token: bench.required_flops); the summary also shows armorm's MFU as issue 10's first figures
counted it (full-square attention, every layer at every token: bench.model_flops), ~4% (short) and ~11%
(long) higher.

    python3 scripts/gpu_check.py --armorm target/gpu/armorm --work /tmp/gpu-check

A dry run of every phase on a CPU (about 90 s on 2 cores, with .venv from fixtures/requirements.txt):

    .venv/bin/python scripts/gpu_check.py --armorm target/release/armorm --device cpu --shape tiny \
      --work /tmp/gpu-check-dry --rows 128 --long-rows 4 --check-long-rows 2 --acc-rows 32 --profile-rows 32 \
      --profile-long-rows 2 --tf-long-batch-sizes 1,2 --best-of-8 --best-of-8-prompts 4 --time-limit 900 \
      --attention auto
"""

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from bench import WORDS, Tokens, make_dataset, model_flops, required_flops  # noqa: E402

SHAPES = {
    # ArmoRM-Llama3-8B-v0.1's published shape.
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128257),
    # For a dry run of this script on a CPU.
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128257),
}
# Dense bf16 of an H100/H200 SXM by the datasheet: the MFU the issue's goals are stated in.
BF16_DENSE_TFLOPS = 989.0
PHASES = ["compile", "short", "long", "profile", "flash3", "flash3-all", "vector", "qkv", "gateup", "accumulate", "pool",
          "fused", "gemm", "parity", "sweep", "residual", "blocked", "best-of-8"]
ALL_FUSED = "vector,qkv,gateup,accumulate"
T0 = time.perf_counter()


def log(msg):
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------- weights and data


def generate(out: Path, shape, device):
    """Random bf16 weights under the published names, sharded with an index, plus the tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file
    h, i, L = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    d = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * d
    g = torch.Generator(device=device).manual_seed(0)

    def normal(*s, std):
        return (torch.randn(*s, generator=g, device=device, dtype=torch.float32) * std).to(torch.bfloat16)

    def ones(n):
        return (1.0 + 0.1 * torch.randn(n, generator=g, device=device)).to(torch.bfloat16)

    weight_map = {}

    def flush(tensors, name):
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(out / name), metadata={"format": "pt"})
        for k in tensors:
            weight_map[k] = name

    n_layer_shards = (L + 3) // 4
    n_shards = n_layer_shards + 2
    shard_name = lambda k: f"model-{k:05d}-of-{n_shards:05d}.safetensors"  # noqa: E731
    flush({"model.embed_tokens.weight": normal(shape["vocab_size"], h, std=1.0)}, shard_name(1))
    for s in range(n_layer_shards):
        t = {}
        for layer in range(4 * s, min(4 * s + 4, L)):
            p = f"model.layers.{layer}."
            t[p + "self_attn.q_proj.weight"] = normal(h, h, std=1.0 / math.sqrt(h))
            t[p + "self_attn.k_proj.weight"] = normal(kv, h, std=1.0 / math.sqrt(h))
            t[p + "self_attn.v_proj.weight"] = normal(kv, h, std=1.0 / math.sqrt(h))
            t[p + "self_attn.o_proj.weight"] = normal(h, h, std=0.5 / math.sqrt(h))
            t[p + "mlp.gate_proj.weight"] = normal(i, h, std=1.0 / math.sqrt(h))
            t[p + "mlp.up_proj.weight"] = normal(i, h, std=1.0 / math.sqrt(h))
            t[p + "mlp.down_proj.weight"] = normal(h, i, std=0.5 / math.sqrt(i))
            t[p + "input_layernorm.weight"] = ones(h)
            t[p + "post_attention_layernorm.weight"] = ones(h)
        flush(t, shard_name(s + 2))
    head = {"model.norm.weight": ones(h), "regression_layer.weight": normal(19, h, std=0.5 / math.sqrt(h))}
    fan_in = h
    for layer in range(3):
        head[f"gating.layers.{layer}.weight"] = normal(1024, fan_in, std=math.sqrt(2.0 / fan_in))
        head[f"gating.layers.{layer}.bias"] = normal(1024, std=0.1)
        fan_in = 1024
    head["gating.layers.3.weight"] = normal(19, 1024, std=15.0 / math.sqrt(1024))
    head["gating.layers.3.bias"] = normal(19, std=0.5)
    head["gating.logit_scale"] = torch.tensor([1.5], dtype=torch.bfloat16)
    head["reward_transform_matrix"] = (torch.eye(19) + 0.3 * torch.randn(19, 19)).to(torch.bfloat16)
    flush(head, shard_name(n_shards))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {
        "architectures": ["LlamaForRewardModelWithGating"], "model_type": "llama", "hidden_act": "silu",
        "attention_bias": False, "bos_token_id": 128000, "eos_token_id": 128009, "pad_token_id": 128256,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.41.2",
        "num_objectives": 19, "gating_temperature": 10, "gating_hidden_dim": 1024, "gating_n_hidden": 3,
        **shape,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
        shutil.copyfile(ROOT / "fixtures" / "llama3-tokenizer" / f, out / f)


def words(rng, n):
    return " ".join(rng.choice(WORDS, n))


def make_long_dataset(path: Path, rows: int, seed: int = 2):
    """Rows of about 3,000-6,200 tokens (this vocabulary is about one token per word)."""
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for i in range(rows):
            total = int(rng.integers(2950, 6150))
            p = int(total * rng.uniform(0.2, 0.8))
            f.write(json.dumps({"id": f"L{i}", "prompt": words(rng, p) + "?",
                                "response": words(rng, total - p) + "."}) + "\n")


def make_best_of_n_dataset(path: Path, prompts: int, n: int = 8, seed: int = 3):
    """`prompts` prompts of ~500 tokens, each with `n` answers of ~150, rows shuffled: the case prefix
    sharing is for, as scripts/bench.py's best-of-8 set."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(prompts):
        prompt = words(rng, int(rng.integers(400, 601))) + "?"
        for k in range(n):
            rows.append({"id": f"b{p}_{k}", "prompt": prompt, "response": words(rng, int(rng.integers(95, 196))) + "."})
    with path.open("w") as f:
        for i in rng.permutation(len(rows)):
            f.write(json.dumps(rows[i]) + "\n")


def read_rows(path: Path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def write_rows(path: Path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- transformers reference


class Reference:
    """transformers' LlamaModel (sdpa) + ArmoRM's head (f32), on `device`."""

    def __init__(self, model_dir: Path, tokens: Tokens, device, dtype):
        from safetensors.torch import load_file
        from transformers import LlamaConfig, LlamaModel
        cfg = LlamaConfig.from_pretrained(str(model_dir))
        cfg.pad_token_id = None
        cfg._attn_implementation = "sdpa"
        with torch.device("meta"):
            self.model = LlamaModel(cfg)
        index = json.loads((model_dir / "model.safetensors.index.json").read_text())
        state, self.head = {}, {}
        for shard in sorted(set(index["weight_map"].values())):
            for k, v in load_file(str(model_dir / shard), device=str(device)).items():
                if k.startswith("model."):
                    state[k[6:]] = v.to(dtype)
                else:
                    self.head[k] = v.float()
        self.model.load_state_dict(state, strict=False, assign=True)
        # The rotary frequencies are a buffer the checkpoint does not hold: built in f32, as
        # from_pretrained builds them whatever the weights' dtype.
        self.model.rotary_emb = type(self.model.rotary_emb)(config=cfg)
        self.model.to(device).eval()
        self.device, self.dtype, self.tokens = device, dtype, tokens

    def to_dtype(self, dtype):
        """Weights to `dtype` in place, instead of a second load: exact both ways, since they were bf16
        on disk. Buffers (the rotary frequencies) stay f32."""
        for p in self.model.parameters():
            p.data = p.data.to(dtype)
        self.dtype = dtype
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def scores(self, last, gate):
        w = self.head
        rewards = last.float() @ w["regression_layer.weight"].T
        x = gate.float()
        for i in range(4):
            x = x @ w[f"gating.layers.{i}.weight"].T + w[f"gating.layers.{i}.bias"]
            x = torch.relu(x) if i < 3 else x
        gating = torch.softmax(x / 10, dim=-1) * w["gating.logit_scale"][0]
        return (rewards * (gating @ w["reward_transform_matrix"].T)).sum(-1)

    def run(self, encoded: dict, batch_size):
        """Scores {id: token ids} in length-sorted padded batches; returns ({id: score}, seconds)."""
        sync()
        start = time.perf_counter()
        ids_sorted = sorted(encoded, key=lambda k: len(encoded[k]))
        out = {}
        with torch.inference_mode():
            for s in range(0, len(ids_sorted), batch_size):
                keys = ids_sorted[s:s + batch_size]
                rows = [encoded[k] for k in keys]
                t = max(len(r) for r in rows)
                ids = torch.zeros((len(rows), t), dtype=torch.long)
                mask = torch.zeros((len(rows), t), dtype=torch.long)
                for r, row in enumerate(rows):
                    ids[r, :len(row)] = torch.tensor(row)
                    mask[r, :len(row)] = 1
                hidden = self.model(input_ids=ids.to(self.device),
                                    attention_mask=mask.to(self.device)).last_hidden_state
                at = torch.arange(len(rows), device=self.device)
                last = hidden[at, torch.tensor([len(r) - 1 for r in rows], device=self.device)]
                gate = hidden[at, torch.tensor([self.tokens.gate(r) for r in rows], device=self.device)]
                out.update(zip(keys, self.scores(last, gate).tolist()))
        sync()
        return out, time.perf_counter() - start


def sync():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def linear_tflops(device, m, k, n):
    """torch.nn.functional.linear in bf16, x (m, k) and a weight (n, k), as the projections run."""
    if device.type != "cuda":
        return float("nan")
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
    f = torch.nn.functional.linear
    for _ in range(3):
        f(x, w)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        f(x, w)
    torch.cuda.synchronize()
    return 2 * m * k * n * 10 / (time.perf_counter() - t) / 1e12


def median_of_3(fn):
    """Seconds of `fn` on the GPU, the median of 3 runs (the caller has warmed it up)."""
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[1]


def flash_varlen_seconds(device, lens, heads, kv_heads, d, budget=65536):
    """torch's own FlashAttention-2 varlen forward (aten._flash_attention_forward, the kernel behind
    its jagged-tensor SDPA) over rows of these lengths, causal, GQA, bf16, in length-sorted batches of
    at most `budget` tokens as armorm forms them: seconds for one layer over all rows (median of 3)."""
    if device.type != "cuda":
        return float("nan")
    batches, cur = [], []
    for n in sorted(lens):
        if cur and sum(cur) + n > budget:
            batches.append(cur)
            cur = []
        cur.append(n)
    batches.append(cur)
    calls = []
    for b in batches:
        total = sum(b)
        cu = torch.tensor([0, *np.cumsum(b)], device=device, dtype=torch.int32)
        q = torch.randn(total, heads, d, device=device, dtype=torch.bfloat16)
        k = torch.randn(total, kv_heads, d, device=device, dtype=torch.bfloat16)
        v = torch.randn(total, kv_heads, d, device=device, dtype=torch.bfloat16)
        calls.append((q, k, v, cu, max(b)))

    def one_layer():
        for q, k, v, cu, m in calls:
            torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, m, m, 0.0, True, False,
                                                    scale=d ** -0.5)

    one_layer()
    torch.cuda.synchronize()
    return median_of_3(one_layer)


def cudnn_attention_seconds(device, lens, heads, d):
    """torch's SDPA restricted to its cuDNN backend (Hopper-native kernels on an H100/H200), causal,
    bf16, one row per call (no padding; k/v with all heads, as GQA expanded), over rows of these
    lengths: seconds for one layer over all rows (median of 3), or NaN where the backend cannot run.
    A yardstick for FlashAttention-3's rate on the same rows, not a baseline."""
    if device.type != "cuda":
        return float("nan")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    rows = [torch.randn(3, 1, heads, n, d, device=device, dtype=torch.bfloat16) for n in lens]

    def one_layer():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            for q, k, v in rows:
                torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    try:
        one_layer()
        torch.cuda.synchronize()
    except RuntimeError as e:
        log(f"cuDNN attention unavailable: {str(e).splitlines()[0][:200]}")
        return float("nan")
    return median_of_3(one_layer)


def matmul_tflops(device, dtype):
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=dtype)
    b = torch.randn(8192, 8192, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192 ** 3 * 10 / (time.perf_counter() - t) / 1e12


# ---------------------------------------------------------------- armorm


# ---------------------------------------------------------------- the decisions, as written beforehand

# The defaults' rules of perf-notes 15-17, written before any of these variants ran on a card: each step
# of the fused-op chain against the step before it, on both cases, and FlashAttention-3 against
# FlashAttention-2 on the same fused ops. (step, result key, the key it is measured against, least gain
# on each case as a fraction). Run 2 repeated one binary within 0.5%, hence the thresholds.
FUSED_STEPS = [("vector", "armorm_vector", "armorm", 0.03),
               ("qkv", "armorm_qkv", "armorm_vector", 0.02),
               ("gateup", "armorm_gateup", "armorm_qkv", 0.02),
               ("accumulate", "armorm_accumulate", "armorm_gateup", 0.02)]
# flash3: at least this much faster on long rows, and no more than the repeat spread slower on short.
FLASH3_LONG_GAIN, FLASH3_SHORT_SLACK = 0.02, 0.005
# "The Pearson figure unchanged": no lower than the one it replaces by more than this (also the bf16
# goal's margin: armorm's figure against transformers-bf16's own).
PEARSON_SLACK = 1e-4
# Issue 10's goals per case: (least ratio to transformers' best sorted batch, least MFU).
GOALS = {"short": (1.5, 0.55), "long": (2.0, 0.45)}


def gains(res, new, old):
    """{case: old seconds / new seconds - 1} over the cases both keys have, short and long."""
    return {case: res[old][case]["seconds"] / res[new][case]["seconds"] - 1
            for case in ("short", "long") if case in res.get(new, {}) and case in res.get(old, {})}


def pearson_of(res, key):
    """The bf16 Pearson figure against transformers-f32 of armorm's run `key` (None: not measured)."""
    return res.get("pearson", {}).get(f"{key}_vs_tf32" if key != "armorm" else "armorm_vs_tf32")


def pearson_kept(res, new, old):
    """Whether `new`'s Pearson figure against transformers-f32 is no lower than `old`'s (None: unknown)."""
    a, b = pearson_of(res, new), pearson_of(res, old)
    return None if a is None or b is None else a >= b - PEARSON_SLACK


def decide(res):
    """The rules above applied to a run's results: (lines to print, the fused steps adopted in order,
    whether flash3 is adopted, the key of the configuration the adopted defaults would run)."""
    lines, adopted, chain_open = [], [], True
    fmt = lambda g: ", ".join(f"{c} {v:+.1%}" for c, v in g.items())  # noqa: E731
    for step, new, old, least in FUSED_STEPS:
        g = gains(res, new, old)
        if len(g) < 2:
            lines.append(f"{step}: not measured on both cases")
            chain_open = False
            continue
        kept = pearson_kept(res, new, old)
        ok = all(v >= least for v in g.values()) and kept is not False
        lines.append(f"{step}: {fmt(g)} against {old} (rule >= {least:.0%} on both, Pearson kept: "
                     f"{'unknown' if kept is None else kept}) -> {'ADOPT' if ok and chain_open else 'keep off'}"
                     + ("" if chain_open or not ok else " (a step before it was not adopted)"))
        if ok and chain_open:
            adopted.append(step)
        else:
            chain_open = False
    base = FUSED_STEPS[len(adopted) - 1][1] if adopted else "armorm"
    # flash3 against flash on the adopted fused ops where that pair ran, else on the default's.
    pair = ("armorm_flash3_all", "armorm_accumulate") if len(adopted) == len(FUSED_STEPS) else \
        ("armorm_flash3", "armorm")
    g = gains(res, *pair)
    kept = pearson_kept(res, *pair)
    flash3 = len(g) == 2 and g["long"] >= FLASH3_LONG_GAIN and g["short"] >= -FLASH3_SHORT_SLACK and \
        kept is not False
    if len(g) == 2:
        lines.append(f"flash3: {fmt(g)} ({pair[0]} against {pair[1]}; rule long >= {FLASH3_LONG_GAIN:.0%}, "
                     f"short >= -{FLASH3_SHORT_SLACK:.1%}, Pearson kept: {'unknown' if kept is None else kept}) "
                     f"-> {'ADOPT' if flash3 else 'keep off'}")
    else:
        lines.append(f"flash3: {pair[0]} against {pair[1]} not measured on both cases")
    for other in [("armorm_flash3", "armorm"), ("armorm_flash3_all", "armorm_accumulate")]:
        if other != pair and len(gains(res, *other)) == 2:
            lines.append(f"flash3 for information: {fmt(gains(res, *other))} ({other[0]} against {other[1]})")
    if flash3:
        base = pair[0] if pair[0] == "armorm_flash3_all" or not adopted else None
        if base is None:
            lines.append("flash3 with only some fused steps adopted ran in no phase: measure that pair")
    fused = ",".join(adopted) or "none (the scalar fused ops stay)"
    lines.append(f"defaults these rules give: fused steps {fused}; attention {'flash3' if flash3 else 'flash'}")
    return lines, adopted, flash3, base


class Armorm:
    """Runs the armorm binary; every run shares one CUDA JIT cache, so only the first compiles."""

    def __init__(self, binary, model_dir, device, budget, attention, work: Path, timeouts, flash3_args):
        self.binary, self.model_dir, self.device, self.budget = str(binary), model_dir, device, budget
        # (any run, a flash3 run): flash3 runs come after the compile run, so none needs its time.
        (self.timeout, self.flash3_timeout), self.flash3_args = timeouts, flash3_args
        self.attention = attention
        self.cache = work / "cuda-cache"
        shutil.rmtree(self.cache, ignore_errors=True)
        # A kernel never run on a card before (flash3) may hang rather than fail: after one flash3 run
        # has failed or timed out, the others are skipped instead of each waiting out its timeout.
        self.flash3_failed = None

    def run(self, data: Path, dtype, env=None, sample_gpu=False, extra=(), cache=None):
        flash3 = tuple(extra[:2]) == self.flash3_args
        if flash3 and self.flash3_failed:
            raise RuntimeError(f"skipped: an earlier --attention flash3 run failed ({self.flash3_failed})")
        try:
            timeout = self.flash3_timeout if flash3 else self.timeout
            return self._run(data, dtype, env, sample_gpu, extra, cache, timeout)
        except Exception as e:
            if flash3:
                self.flash3_failed = str(e).splitlines()[0][:200]
            raise

    def _run(self, data: Path, dtype, env, sample_gpu, extra, cache, timeout):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out.jsonl"
            # f32 has no flash kernels: auto picks blocked attention there. `extra` may name its own.
            attention = [] if "--attention" in extra else \
                ["--attention", self.attention if dtype != "f32" else "auto"]
            cmd = [self.binary, "score", str(data), "--model", str(self.model_dir), "-o", str(out),
                   "--device", self.device, "--dtype", dtype, "--max-batch-tokens", str(self.budget),
                   *attention, *extra]
            full_env = {**os.environ, "CUDA_CACHE_PATH": str(cache or self.cache),
                        "CUDA_CACHE_MAXSIZE": str(4 << 30), **(env or {})}
            sampler = GpuSampler() if sample_gpu else None
            t = time.perf_counter()
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout)
            except subprocess.TimeoutExpired:
                if sampler:
                    sampler.stop()
                raise RuntimeError(f"armorm timed out after {timeout:g} s ({' '.join(cmd)})") from None
            wall = time.perf_counter() - t
            gpu = sampler.stop() if sampler else None
            if p.returncode != 0:
                raise RuntimeError(f"armorm failed ({' '.join(cmd)}):\n{p.stderr[-2000:]}")
            scores = {r["id"]: r["score"] for r in map(json.loads, out.read_text().splitlines())}
        summary = [l for l in p.stderr.splitlines() if "scored" in l][-1]
        seconds = float(summary.split(" in ")[1].split(" s")[0])
        setup = SETUP.search(summary)
        return dict(seconds=seconds, wall=wall, scores=scores, summary=summary, gpu=gpu,
                    profile=parse_profile(p.stderr),
                    attention=setup[1] if setup else "?", budget=int(setup[2]) if setup else None)

    def cache_mib(self):
        return sum(f.stat().st_size for f in self.cache.rglob("*") if f.is_file()) / 2 ** 20


# The end of armorm's summary line: how the rows ran.
SETUP = re.compile(r"(\S+) attention(?:, [^,]+)*, batches of up to (\d+) tokens")
PROFILE_LINE = re.compile(r"^armorm: profile: (\S+)\s+([\d.]+) s\s+([\d.]+)%")


def parse_profile(stderr):
    """[(section, seconds, share %)] from ARMORM_PROFILE's lines, largest first."""
    return [(m[1], float(m[2]), float(m[3])) for m in map(PROFILE_LINE.match, stderr.splitlines()) if m]


class GpuSampler:
    """nvidia-smi every 250 ms while armorm runs: utilization and power, to tell host from kernels."""

    def __init__(self):
        try:
            self.p = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu,power.draw,memory.used",
                 "--format=csv,noheader,nounits", "-lms", "250"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self.p = None

    def stop(self):
        if self.p is None:
            return None
        self.p.terminate()
        text, _ = self.p.communicate()
        vals = []
        for line in text.splitlines():
            try:
                vals.append([float(x) for x in line.split(",")])
            except ValueError:
                pass
        if not vals:
            return None
        # Busy samples only: the load phase would drag the mean down.
        busy = [v for v in vals if v[0] > 0] or vals
        return dict(util=float(np.mean([v[0] for v in busy])), watts=float(np.mean([v[1] for v in busy])),
                    mem_mib=max(v[2] for v in vals))


# ---------------------------------------------------------------- the check


class Check:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.phases = [p for p in PHASES if p not in args.skip and (p != "best-of-8" or args.best_of_8)]
        # A dry run on a CPU (--attention varlen-reference) runs the flash3 phases on the flat reference
        # instead, so that their plumbing and summary rows are exercised without a GPU.
        self.flash3_args = ("--attention", "varlen-reference" if args.attention == "varlen-reference" else "flash3")
        self.phase_seconds = {}
        self.res = {"shape": args.shape, "phases_skipped": []}
        self.json_path = Path(args.json) if args.json else self.work / "gpu-check.json"
        self.ref = None

    def on(self, phase):
        if phase not in self.phases:
            return False
        if time.perf_counter() - T0 > self.args.time_limit:
            log(f"skipping {phase}: past --time-limit {self.args.time_limit} s")
            self.res["phases_skipped"].append(phase)
            return False
        return True

    def timed(self, name, fn):
        """A phase that fails is reported and the others still run: a device lease is too short to
        lose every number to one error."""
        t = time.perf_counter()
        log(f"== {name}")
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            log(f"PHASE FAILED: {name}: {type(e).__name__}: {e}")
            self.res.setdefault("errors", []).append(f"{name}: {type(e).__name__}: {str(e)[:300]}")
        self.phase_seconds[name] = time.perf_counter() - t
        # Every number so far, after every phase: a lease that ends with a kill leaves them behind.
        self.save()

    def save(self):
        self.json_path.write_text(json.dumps(self.res, indent=1, default=str))

    def setup(self):
        a = self.args
        self.model_dir = self.work / f"model-{a.shape}"
        if not (self.model_dir / "config.json").exists():
            log(f"generating random {a.shape} weights ...")
            generate(self.model_dir, SHAPES[a.shape], self.device)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self.cfg = json.loads((self.model_dir / "config.json").read_text())
        self.tokens = Tokens(self.model_dir)
        short, long_, bo8 = self.work / "short.jsonl", self.work / "long.jsonl", self.work / "best-of-8.jsonl"
        make_dataset(short, a.rows, seed=1)
        make_long_dataset(long_, a.long_rows)
        self.sets = {"short": short, "long": long_}
        if "best-of-8" in self.phases:
            make_best_of_n_dataset(bo8, a.best_of_8_prompts)
            self.sets["best-of-8"] = bo8
        self.rows = {k: read_rows(p) for k, p in self.sets.items()}
        self.enc = {k: {r["id"]: self.tokens.encode(r) for r in rows} for k, rows in self.rows.items()}
        self.lens = {k: [len(e) for e in enc.values()] for k, enc in self.enc.items()}
        # MFU counts the FLOPs a score requires (causal attention, the last layer where it is read);
        # the issue's first figures counted more (`model_flops`), which the summary shows beside it.
        self.flops = {k: required_flops(self.cfg, lens) for k, lens in self.lens.items()}
        self.issue_flops = {k: model_flops(self.cfg, lens) for k, lens in self.lens.items()}
        # The first rows of each set: f32 parity on `check`, Pearson figures on `acc`.
        self.check_rows = self.rows["short"][:a.check_rows] + self.rows["long"][:a.check_long_rows]
        self.acc_ids = [r["id"] for r in self.rows["short"][:a.acc_rows]] + \
                       [r["id"] for r in self.rows["long"][:a.check_long_rows]]
        for k, lens in self.lens.items():
            log(f"{k}: {len(lens)} rows, {sum(lens)} tokens, {min(lens)}-{max(lens)} per row, "
                f"{self.flops[k] / 1e15:.3f} PFLOP")
        self.res["sets"] = {k: dict(rows=len(l), tokens=sum(l), shortest=min(l), longest=max(l),
                                    pflop=self.flops[k] / 1e15, issue_pflop=self.issue_flops[k] / 1e15)
                            for k, l in self.lens.items()}
        self.peak = matmul_tflops(self.device, torch.bfloat16)
        self.res["matmul_tflops"] = self.peak
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info()
            self.res["gpu"] = dict(name=torch.cuda.get_device_name(), free_gib=free / 2 ** 30,
                                   total_gib=total / 2 ** 30)
        self.armorm = Armorm(a.armorm, self.model_dir, "cuda:0" if self.device.type == "cuda" else "cpu",
                             a.max_batch_tokens, a.attention, self.work, (a.run_timeout, a.flash3_timeout),
                             self.flash3_args)

    # -- armorm phases

    def compile(self):
        """First run on an empty JIT cache, second on the filled one: the difference is the compile."""
        tiny = write_rows(self.work / "warmup.jsonl", self.rows["short"][:4])
        first = self.armorm.run(tiny, "bf16")
        c = dict(first_wall=first["wall"], first_scoring=first["seconds"], cache_mib=self.armorm.cache_mib())
        if self.on("compile"):
            second = self.armorm.run(tiny, "bf16")
            c.update(second_wall=second["wall"], second_scoring=second["seconds"])
            c["compile_s"] = first["wall"] - second["wall"]
            log(f"first run {first['wall']:.1f} s, second {second['wall']:.1f} s: compile ~{c['compile_s']:.1f} s; "
                f"JIT cache {c['cache_mib']:.0f} MiB")
        self.res["compile"] = c

    def variant(self, label, env=None, extra=()):
        """armorm bf16 on both cases with another environment or more flags, results under `label`."""
        for case in ("short", "long"):
            if self.on(case):
                self.armorm_case(case, label, extra, env)

    def fused(self):
        """The fused ops are the default on CUDA since the first H200 check: this runs without them."""
        self.variant("armorm_unfused", {"ARMORM_FUSED_OPS": "0"})

    def vector(self):
        self.variant("armorm_vector", {"ARMORM_FUSED_OPS": "vector"})

    def qkv(self):
        self.variant("armorm_qkv", {"ARMORM_FUSED_OPS": "vector,qkv"})

    def gateup(self):
        self.variant("armorm_gateup", {"ARMORM_FUSED_OPS": "vector,qkv,gateup"})

    def accumulate(self):
        self.variant("armorm_accumulate", {"ARMORM_FUSED_OPS": "vector,qkv,gateup,accumulate"})

    def flash3(self):
        """FlashAttention-3 (Hopper) in place of FlashAttention-2, the rest as the default runs it."""
        self.variant("armorm_flash3", extra=self.flash3_args)

    def flash3_all(self):
        """FlashAttention-3 with all four fused-op changes: the combination perf-notes 17 predicts."""
        self.variant("armorm_flash3_all", {"ARMORM_FUSED_OPS": ALL_FUSED}, self.flash3_args)

    def pool(self):
        self.variant("armorm_pool", {"ARMORM_KEEP_FREED": "0"})

    def gemm(self):
        """torch's GEMMs (cuBLAS) on the projections' own shapes at a 65,536-token batch: the rate the
        card gives these shapes, to set beside armorm's profile (its GEMM sections)."""
        h, i = self.cfg["hidden_size"], self.cfg["intermediate_size"]
        kv = self.cfg["num_key_value_heads"] * h // self.cfg["num_attention_heads"]
        rates = {}
        for name, k, n in (("q_proj", h, h), ("k_proj", h, kv), ("o_proj", h, h), ("gate_proj", h, i),
                           ("down_proj", i, h)):
            rates[name] = linear_tflops(self.device, 65536, k, n)
        self.res["gemm_tflops"] = rates
        log("torch F.linear at 65,536 tokens, TFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()))
        # torch's FA2 varlen on the sets' own rows: what the kernel family gives these lengths, beside
        # armorm's varlen_attn section (perf-notes 15 measured ~29 TFLOP/s on short rows, 263 on long).
        heads, kv_heads = self.cfg["num_attention_heads"], self.cfg["num_key_value_heads"]
        d = self.cfg["hidden_size"] // heads
        def rate(name, case, secs):
            lens = self.lens[case]
            flop = sum(4 * (n * (n + 1) / 2) * d * heads for n in lens)
            r = dict(seconds_per_layer=secs, tflops=flop / secs / 1e12 if secs == secs else secs,
                     seconds_all_layers=secs * self.cfg["num_hidden_layers"])
            log(f"torch {name} on the {case} rows: {secs * 1e3:.2f} ms a layer, {r['tflops']:.0f} TFLOP/s, "
                f"{r['seconds_all_layers']:.3f} s for all layers")
            return r

        for case, lens in self.lens.items():
            try:
                secs = flash_varlen_seconds(self.device, lens, heads, kv_heads, d)
            except RuntimeError as e:
                log(f"torch flash varlen on the {case} rows failed: {str(e).splitlines()[0][:200]}")
                continue
            self.res.setdefault("torch_flash", {})[case] = rate("flash varlen", case, secs)
        # torch's cuDNN attention (Hopper-native) on the long rows: a yardstick for flash3's varlen_attn
        # section under `profile flash3:...` (perf-notes 17).
        if "long" in self.lens:
            self.res["torch_cudnn_attention"] = rate(
                "cuDNN attention", "long", cudnn_attention_seconds(self.device, self.lens["long"], heads, d))

    def residual(self):
        self.variant("armorm_residual", {"ARMORM_BF16_RESIDUAL": "1"})

    def blocked(self):
        self.variant("armorm_blocked", extra=("--attention", "blocked"))

    def armorm_case(self, case, label=None, extra=(), env=None):
        r = self.armorm.run(self.sets[case], "bf16", sample_gpu=self.device.type == "cuda", extra=extra,
                            env=env)
        log(f"armorm bf16 {case} {' '.join(extra)} {env or ''}: {r['summary']} "
            f"(wall with load {r['wall']:.1f} s; gpu {r['gpu']})")
        keys = ("seconds", "wall", "summary", "gpu", "attention", "budget")
        self.res.setdefault(label or "armorm", {})[case] = {k: r[k] for k in keys}
        self.res[label or "armorm"][case]["scores"] = r["scores"]

    def profile(self):
        """The default, then each ARMORM_FUSED_OPS value of --profile-fused (`flash3:` before one runs it
        under --attention flash3): section by section, so that a variant's gain can be set against the
        sections its prediction names."""
        a = self.args
        for spec in [None, *a.profile_fused]:
            key = "profile" if spec is None else f"profile {spec}"
            fused, extra = spec, ()
            if spec and spec.startswith("flash3:"):
                fused, extra = spec.split(":", 1)[1], self.flash3_args
            env = {"ARMORM_PROFILE": "1", **({"ARMORM_FUSED_OPS": fused} if fused else {})}
            for case, n in (("short", a.profile_rows), ("long", a.profile_long_rows)):
                if n == 0:
                    continue
                data = write_rows(self.work / f"profile-{case}.jsonl", self.rows[case][:n])
                r = self.armorm.run(data, "bf16", env=env, extra=extra)
                if not r["profile"]:
                    raise RuntimeError(f"ARMORM_PROFILE=1 printed no profile for {case}")
                tokens = sum(self.lens[case][:n])
                self.res.setdefault(key, {})[case] = dict(rows=n, tokens=tokens, seconds=r["seconds"],
                                                          sections=r["profile"])
                log(f"{key} {case} ({n} rows, {tokens / r['seconds']:.0f} tok/s while profiled): " +
                    ", ".join(f"{s} {share:.1f}%" for s, _, share in r["profile"][:6]))

    def armorm_f32(self):
        check = write_rows(self.work / "check.jsonl", self.check_rows)
        r = self.armorm.run(check, "f32")
        self.res["armorm_f32"] = r["scores"]
        log(f"armorm f32 on {len(self.check_rows)} check rows: {r['summary']}")

    # -- transformers phases

    def reference(self, dtype):
        if self.ref is None:
            t = time.perf_counter()
            self.ref = Reference(self.model_dir, self.tokens, self.device, dtype)
            log(f"transformers loaded in {dtype} ({time.perf_counter() - t:.1f} s)")
        elif self.ref.dtype != dtype:
            self.ref.to_dtype(dtype)
        return self.ref

    def parity(self):
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("highest")  # no TF32: f32 must mean f32 here
        ref = self.reference(torch.float32)
        ids = list(dict.fromkeys(self.acc_ids + [r["id"] for r in self.check_rows]))
        enc = {i: self.enc["short"].get(i) or self.enc["long"][i] for i in ids}
        short = {i: e for i, e in enc.items() if not i.startswith("L")}
        long_ = {i: e for i, e in enc.items() if i.startswith("L")}
        r32, s1 = ref.run(short, self.args.f32_batch_size) if short else ({}, 0.0)
        r32_long, s2 = ref.run(long_, 2) if long_ else ({}, 0.0)
        r32.update(r32_long)
        self.res["tf_f32"] = r32
        a32 = self.res.get("armorm_f32", {})
        for case, pred in (("short", lambda i: not i.startswith("L")), ("long", lambda i: i.startswith("L"))):
            keys = [i for i in a32 if pred(i)]
            if keys:
                d = max(abs(a32[i] - r32[i]) for i in keys)
                self.res.setdefault("f32_parity", {})[case] = dict(rows=len(keys), max_abs_diff=d)
                log(f"f32 parity {case}: max |diff| {d:.2e} on {len(keys)} rows")
        log(f"transformers f32 on {len(r32)} accuracy rows: {s1 + s2:.1f} s")

    def sweep(self):
        ref = self.reference(torch.bfloat16)
        for case, sizes in (("short", self.args.tf_batch_sizes), ("long", self.args.tf_long_batch_sizes)):
            if case == "long" and "long" not in self.phases:
                continue
            self.tf_case(ref, case, sizes)

    def tf_case(self, ref, case, sizes):
        enc = self.enc[case]
        runs = {}
        for bs in sizes:
            if runs and time.perf_counter() - T0 > self.args.time_limit:
                log(f"skipping transformers {case} at batch sizes >= {bs}: past --time-limit")
                self.res["phases_skipped"].append(f"sweep {case} x{bs}")
                break
            # Warm-up on the longest batch this size makes: allocator and kernels ready before timing.
            longest = dict(sorted(enc.items(), key=lambda kv: -len(kv[1]))[:bs])
            try:
                ref.run(longest, bs)
                scores, secs = ref.run(enc, bs)
            except torch.OutOfMemoryError:
                log(f"transformers bf16 {case}, sorted batches of {bs}: out of memory")
                self.res.setdefault("errors", []).append(f"transformers {case} x{bs}: out of memory")
                torch.cuda.empty_cache()
                continue
            runs[bs] = dict(seconds=secs, scores=scores)
            log(f"transformers bf16 {case}, sorted batches of {bs}: {secs:.2f} s, "
                f"{sum(self.lens[case]) / secs:.0f} tok/s")
        if not runs:
            return
        best = min(runs, key=lambda bs: runs[bs]["seconds"])
        self.res.setdefault("tf_bf16", {})[case] = dict(runs={bs: r["seconds"] for bs, r in runs.items()},
                                                       best=best, scores=runs[best]["scores"])

    def run(self):
        """Most wanted first, so that --time-limit cuts the least useful: armorm's own runs, the
        transformers sweep the ratios need, then the f32 reference."""
        self.timed("setup", self.setup)
        # A warm-up run always: later timings must not include the first run's kernel compile.
        self.timed("compile", self.compile)
        for case in ("short", "long"):
            if self.on(case):
                self.timed(f"armorm {case}", lambda: self.armorm_case(case))
        if self.on("profile"):
            self.timed("profile", self.profile)
        if self.on("flash3"):
            self.timed("armorm flash3", self.flash3)
        if self.on("flash3-all"):
            self.timed("armorm flash3 and all four fused-op changes", self.flash3_all)
        if self.on("vector"):
            self.timed("armorm vector kernels", self.vector)
        if self.on("qkv"):
            self.timed("armorm vector kernels and one q/k/v GEMM", self.qkv)
        if self.on("gateup"):
            self.timed("armorm vector kernels, one q/k/v GEMM, one gate/up GEMM", self.gateup)
        if self.on("accumulate"):
            self.timed("armorm vector kernels, joined GEMMs, accumulating projections", self.accumulate)
        if self.on("pool"):
            self.timed("armorm pool released", self.pool)
        if self.on("fused"):
            self.timed("armorm unfused", self.fused)
        if self.on("best-of-8"):
            self.timed("armorm best-of-8", lambda: self.armorm_case("best-of-8"))
            self.timed("armorm best-of-8 unshared", lambda: self.armorm_case(
                "best-of-8", "armorm_unshared", ("--prefix-sharing", "off")))
        # The f32 reference (parity, and every Pearson figure) before the sweep: it is the shorter of the
        # two, and the sweep cuts its own largest batch sizes when time runs short.
        if self.on("parity"):
            self.timed("armorm f32", self.armorm_f32)
            self.timed("transformers f32", self.parity)
        if self.on("sweep"):
            self.timed("transformers bf16", self.sweep)
        if self.on("best-of-8"):
            best_short = self.res.get("tf_bf16", {}).get("short", {}).get("best")
            sizes = [best_short] if best_short else self.args.tf_batch_sizes
            self.timed("transformers best-of-8", lambda: self.tf_case(self.reference(torch.bfloat16),
                                                                      "best-of-8", sizes))
        # A diagnostic, after everything the goals need: torch's private attention ops run in this
        # process, and a fault there would leave its CUDA context unusable for transformers.
        if self.on("gemm"):
            self.timed("torch gemm", self.gemm)
        # After the ratios and Pearson figures the issue's goals need: a variant to decide a default.
        if self.on("residual"):
            self.timed("armorm bf16 residual", self.residual)
        # Last: the issue already states the blocked path's rates; this only repeats them on this card.
        if self.on("blocked"):
            self.timed("armorm blocked", self.blocked)
        self.res["phase_seconds"] = self.phase_seconds
        self.res["total_seconds"] = time.perf_counter() - T0
        try:
            return self.summary()
        except Exception:
            # The phases' own log lines above still hold every figure; the JSON is written by main.
            traceback.print_exc()
            print("GPU CHECK FAILED: the summary itself failed (figures: the log above and the JSON)")
            return False

    # -- the summary

    def mfu(self, case, secs):
        return self.flops[case] / secs / 1e12 / BF16_DENSE_TFLOPS

    def decided(self, res):
        """Prints the pre-written rules' decisions (`decide`) and returns the issue's goals as the
        configuration they adopt measured them, where that is not the default run itself."""
        lines, adopted, flash3, key = decide(res)
        res["decisions"] = dict(lines=lines, fused_steps=adopted, flash3=flash3, config=key)
        for line in lines:
            print(f"decision {line}")
        if key in (None, "armorm"):
            return []
        return self.goals_of(res, key, f" with the adopted defaults ({key})")

    def goals_of(self, res, key, label=""):
        """Issue 10's goals as armorm's run `key` met them: (goal, value, met)."""
        goals = []
        for case, (ratio_goal, mfu_goal) in GOALS.items():
            run, tf = res.get(key, {}).get(case), res.get("tf_bf16", {}).get(case)
            if not run:
                continue
            if tf:
                ratio = min(tf["runs"].values()) / run["seconds"]
                goals.append((f"{case}{label}: armorm / best transformers >= {ratio_goal}x", f"{ratio:.2f}x",
                              ratio >= ratio_goal))
            mfu = self.mfu(case, run["seconds"])
            goals.append((f"{case}{label}: armorm MFU >= {mfu_goal:.0%}", f"{mfu:.1%}", mfu >= mfu_goal))
        pv, pt = pearson_of(res, key), res.get("pearson", {}).get("tf16_vs_tf32")
        if pv is not None and pt is not None:
            goals.append((f"bf16{label}: armorm agrees with tf-f32 as well as tf-bf16 does",
                          f"{pv:.5f} vs {pt:.5f}", pv >= pt - PEARSON_SLACK))
        return goals

    def pearson(self, a, b):
        keys = [i for i in self.acc_ids if i in a and i in b]
        if len(keys) < 3:
            return None, 0
        return float(np.corrcoef([a[i] for i in keys], [b[i] for i in keys])[0, 1]), len(keys)

    def summary(self):
        res, p = self.res, print
        gpu = res.get("gpu", {})
        p("\n" + "=" * 100)
        memory = f"  free {gpu['free_gib']:.0f}/{gpu['total_gib']:.0f} GiB" if gpu else ""
        p(f"GPU CHECK  {gpu.get('name', 'cpu')}  shape {res['shape']}{memory}  measured bf16 matmul "
          f"{res['matmul_tflops']:.0f} TFLOP/s (MFU below is of {BF16_DENSE_TFLOPS:.0f})")
        p("phases: " + ", ".join(f"{k} {v:.0f}s" for k, v in self.phase_seconds.items()) +
          f"; total {res['total_seconds']:.0f} s")
        c = res.get("compile", {})
        if "compile_s" in c:
            p(f"kernel compile: first run {c['first_wall']:.1f} s, second {c['second_wall']:.1f} s -> "
              f"~{c['compile_s']:.1f} s on a fresh node; JIT cache {c['cache_mib']:.0f} MiB (CUDA_CACHE_PATH)")
        if res.get("gemm_tflops"):
            p("torch F.linear at 65,536 tokens (TFLOP/s): " +
              ", ".join(f"{k} {v:.0f}" for k, v in res["gemm_tflops"].items()))
        c = res.get("torch_cudnn_attention")
        if c:
            p(f"torch cuDNN attention, long rows: {c['tflops']:.0f} TFLOP/s, {c['seconds_all_layers']:.3f} s for all "
              f"layers (yardstick for flash3's varlen_attn section)")
        for case, f in res.get("torch_flash", {}).items():
            p(f"torch flash varlen, {case} rows: {f['tflops']:.0f} TFLOP/s, {f['seconds_all_layers']:.3f} s for all "
              f"layers (armorm's profile: varlen_attn section)")
        p(f"{'case':10} {'pipeline':58} {'seconds':>8} {'tok/s':>8} {'MFU':>6} {'vs best tf':>10}")
        goals = []
        for case in ("short", "long", "best-of-8"):
            arm = res.get("armorm", {}).get(case)
            tf = res.get("tf_bf16", {}).get(case)
            if not arm and not tf:
                continue
            tokens = res["sets"][case]["tokens"]
            best = min(tf["runs"].values()) if tf else None
            rows = []
            if arm:
                rows.append((f"armorm bf16 {arm['attention']} ({arm['budget']} tok)", arm["seconds"]))
            # Variants of armorm's own run: (key, row label, what is compared, which side is the new one).
            for key, label, versus, new_is_variant in (
                    ("armorm_fused", "armorm bf16 ARMORM_FUSED_OPS=1", "fused ops vs not", True),
                    ("armorm_unfused", "armorm bf16 ARMORM_FUSED_OPS=0", "fused ops vs not", False),
                    ("armorm_vector", "armorm bf16 ARMORM_FUSED_OPS=vector", "vector vs scalar kernels", True),
                    ("armorm_qkv", "armorm bf16 ARMORM_FUSED_OPS=vector,qkv", "vector+qkv vs default", True),
                    ("armorm_gateup", "armorm bf16 ARMORM_FUSED_OPS=vector,qkv,gateup",
                     "vector+qkv+gateup vs default", True),
                    ("armorm_accumulate", "armorm bf16 ARMORM_FUSED_OPS=vector,qkv,gateup,accumulate",
                     "all four vs default", True),
                    ("armorm_flash3", "armorm bf16 --attention flash3", "flash3 vs default", True),
                    ("armorm_flash3_all", "armorm bf16 --attention flash3, all four fused",
                     "flash3+all four vs default", True),
                    ("armorm_pool", "armorm bf16 ARMORM_KEEP_FREED=0", "pool kept vs released", False),
                    ("armorm_residual", "armorm bf16 ARMORM_BF16_RESIDUAL=1", "bf16 vs f32 residual", True),
                    ("armorm_blocked", "armorm bf16 --attention blocked",
                     f"{arm['attention'] if arm else ''} vs blocked", False)):
                other = res.get(key, {}).get(case)
                if not (arm and other):
                    continue
                rows.append((label, other["seconds"]))
                diff = max(abs(arm["scores"][i] - other["scores"][i]) for i in arm["scores"])
                new, old = (other, arm) if new_is_variant else (arm, other)
                p(f"{case:10} armorm {versus} (bf16): max |score diff| {diff:.2e}, "
                  f"{old['seconds'] / new['seconds']:.2f}x faster")
            off = res.get("armorm_unshared", {}).get(case)
            if arm and off:
                rows.append(("armorm bf16 --prefix-sharing off", off["seconds"]))
                goals.append((f"{case}: armorm sharing / armorm unshared >= 2.5x",
                              f"{off['seconds'] / arm['seconds']:.2f}x", off["seconds"] / arm["seconds"] >= 2.5))
                diff = max(abs(arm["scores"][i] - off["scores"][i]) for i in arm["scores"])
                p(f"{case:10} armorm sharing vs unshared (bf16): max |score diff| {diff:.2e}")
            for bs, s in (tf or {}).get("runs", {}).items():
                rows.append((f"transformers bf16 sdpa, sorted x{bs}", s))
            for label, s in rows:
                vs = f"{best / s:9.2f}x" if best else ""
                p(f"{case:10} {label:58} {s:8.2f} {tokens / s:8.0f} {self.mfu(case, s):6.1%} {vs:>10}")
            if arm:
                issue = self.issue_flops[case] / arm["seconds"] / 1e12 / BF16_DENSE_TFLOPS
                p(f"{'':10} armorm's MFU as issue 10 first counted FLOPs (full-square attention, every layer "
                  f"at every token): {issue:.1%}; the MFU column counts what a score requires")
            if arm and arm.get("gpu"):
                g = arm["gpu"]
                p(f"{'':10} armorm while scoring: GPU busy {g['util']:.0f}%, {g['watts']:.0f} W, "
                  f"{g['mem_mib'] / 1024:.1f} GiB used")
        for key in [k for k in res if k.startswith("profile")]:
            for case, prof in res[key].items():
                top = ", ".join(f"{s} {share:.1f}%" for s, _, share in prof["sections"][:8])
                p(f"{key} {case} ({prof['rows']} rows, {prof['tokens'] / prof['seconds']:.0f} tok/s profiled): "
                  f"{top}")
        ok = True
        if "parity" in self.phases and not res.get("f32_parity"):
            ok = False
            p("f32 parity did not run (skipped or failed): correctness on this card is not shown")
        for case, par in res.get("f32_parity", {}).items():
            good = par["max_abs_diff"] <= 1e-3
            ok &= good
            p(f"f32 parity {case}: max |diff| {par['max_abs_diff']:.2e} on {par['rows']} rows "
              f"({'ok' if good else 'FAILED'}, must be <= 1e-3)")
        a16 = {**res.get("armorm", {}).get("short", {}).get("scores", {}),
               **res.get("armorm", {}).get("long", {}).get("scores", {})}
        t16 = {**res.get("tf_bf16", {}).get("short", {}).get("scores", {}),
               **res.get("tf_bf16", {}).get("long", {}).get("scores", {})}
        t32 = res.get("tf_f32", {})
        pa, n = self.pearson(a16, t32)
        pt, _ = self.pearson(t16, t32)
        pat, _ = self.pearson(a16, t16)
        fmt = lambda v: "n/a" if v is None else f"{v:.5f}"  # noqa: E731
        p(f"bf16 Pearson on {n} rows: armorm vs transformers-f32 {fmt(pa)} | transformers-bf16 vs "
          f"transformers-f32 {fmt(pt)} | armorm vs transformers-bf16 {fmt(pat)}")
        res["pearson"] = dict(rows=n, armorm_vs_tf32=pa, tf16_vs_tf32=pt, armorm_vs_tf16=pat)
        # The variants whose default is decided from this run: their own figure against transformers-f32.
        variants = []
        for key, name in (("armorm_fused", "fused ops"), ("armorm_unfused", "unfused ops"),
                          ("armorm_vector", "vector kernels"), ("armorm_qkv", "vector+qkv"),
                          ("armorm_gateup", "vector+qkv+gateup"), ("armorm_accumulate", "all four"),
                          ("armorm_flash3", "flash3"), ("armorm_flash3_all", "flash3+all four"),
                          ("armorm_residual", "bf16 residual")):
            scores = {**res.get(key, {}).get("short", {}).get("scores", {}),
                      **res.get(key, {}).get("long", {}).get("scores", {})}
            pv, _ = self.pearson(scores, t32)
            if pv is not None:
                res["pearson"][f"{key}_vs_tf32"] = pv
                variants.append(f"armorm {name} vs transformers-f32 {fmt(pv)}")
        if variants:
            p("bf16 Pearson of the variants: " + " | ".join(variants))
        goals += self.goals_of(res, "armorm")
        if pa is not None:
            ok &= pa >= 0.99
        goals += self.decided(res)
        res["goals"] = [dict(goal=g, value=v, met=m) for g, v, m in goals]
        for g, v, m in goals:
            p(f"goal {g}: {v} {'MET' if m else 'not met'}")
        if res["phases_skipped"]:
            p(f"skipped for time: {', '.join(res['phases_skipped'])}")
        for e in res.get("errors", []):
            ok = False
            p(f"ERROR {e.splitlines()[0]}")
        p("GPU CHECK OK (correctness; the goals above are the speed targets)" if ok else "GPU CHECK FAILED")
        return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    ap.add_argument("--armorm", required=True)
    ap.add_argument("--work", default="/tmp/armorm-gpu-check")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="8b", choices=SHAPES)
    ap.add_argument("--rows", type=int, default=1024, help="short rows (~265 tokens)")
    ap.add_argument("--long-rows", type=int, default=32, help="long rows (3,000-6,200 tokens)")
    ap.add_argument("--check-rows", type=int, default=8, help="short rows for f32 parity")
    ap.add_argument("--check-long-rows", type=int, default=4, help="long rows for f32 parity")
    ap.add_argument("--acc-rows", type=int, default=128, help="short rows for the Pearson figures")
    # The whole sets: with one pass, a run's first-use costs (lazy kernel loads, cuBLAS heuristics) land
    # in whichever section meets them first (the head's f32 GEMMs took 6.9% of a one-pass profile).
    ap.add_argument("--profile-rows", type=int, default=1024, help="short rows of the ARMORM_PROFILE run")
    ap.add_argument("--profile-long-rows", type=int, default=32, help="long rows of the ARMORM_PROFILE run")
    ap.add_argument("--profile-fused", nargs="*", default=[ALL_FUSED, f"flash3:{ALL_FUSED}"],
                    help="ARMORM_FUSED_OPS values profiled after the default, `flash3:` before one to run "
                         "it under --attention flash3 (none: the default only)")
    ap.add_argument("--tf-batch-sizes", type=ints, default=[16, 32, 64, 128])
    ap.add_argument("--tf-long-batch-sizes", type=ints, default=[2, 4, 8, 16])
    ap.add_argument("--f32-batch-size", type=int, default=32, help="transformers f32 on the accuracy rows")
    ap.add_argument("--max-batch-tokens", default="auto", help="armorm's token budget (a number or auto)")
    ap.add_argument("--attention", default="flash", choices=["flash", "blocked", "auto", "varlen-reference"],
                    help="armorm's --attention in the bf16 runs (flash needs a flash-attn build; "
                         "varlen-reference runs the flat layout anywhere, for a dry run on a CPU, and "
                         "stands in for flash3 in the flash3 phases)")
    ap.add_argument("--skip", type=lambda s: [x for x in s.split(",") if x], default=[],
                    help=f"comma-separated phases to skip, of {','.join(PHASES)}")
    ap.add_argument("--best-of-8", action="store_true", help="also the best-of-8 case (for issue 12)")
    ap.add_argument("--best-of-8-prompts", type=int, default=64)
    ap.add_argument("--run-timeout", type=float, default=120,
                    help="seconds after which one armorm run is killed and its phase fails (a hung kernel "
                         "must not take the lease; the slowest run measured, the first on a fresh node, "
                         "took 24 s); after a flash3 run fails, the other flash3 runs are skipped")
    ap.add_argument("--flash3-timeout", type=float, default=60,
                    help="--run-timeout for --attention flash3 runs: a kernel never run on a card may hang, "
                         "and these runs come after the compile run (the short phase, load included, took 10 s)")
    ap.add_argument("--time-limit", type=float, default=400,
                    help="seconds after which the phases not yet started are skipped (the summary still prints)")
    ap.add_argument("--json", default=None, help="write every number here [default: WORK/gpu-check.json]")
    args = ap.parse_args()
    unknown = set(args.skip) - set(PHASES)
    if unknown:
        ap.error(f"--skip: unknown phases {sorted(unknown)}; phases are {','.join(PHASES)}")
    check = Check(args)
    # A lease that runs out sends SIGTERM: end through `finally`, so that the numbers are written.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ok = False
    try:
        ok = check.run()
    finally:
        # Every number measured so far, even if the summary failed: a device lease is not repeated.
        check.save()
        print(f"numbers: {check.json_path}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
