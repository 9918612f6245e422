#!/usr/bin/env python3
"""GPU check: armorm against transformers on a random ArmoRM of the real 8B shape, in bf16.

Run by scripts/gpu-check.sh on the device machine (torch and transformers there, no internet, no Rust).
It generates random bf16 weights of ArmoRM-Llama3-8B's shape on the GPU, checks armorm's scores against
transformers on a few rows (f32 on both sides, then bf16 on all rows), times both on the same 512 rows
(bf16; transformers with sdpa and sorted padded batches) and prints tokens/s, the ratio and MFU.

    python3 scripts/gpu_check.py --armorm target/gpu/armorm --work /tmp/gpu-check
    python3 scripts/gpu_check.py --armorm target/release/armorm --device cpu --shape tiny   # dry run
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from bench import GATING_TEXT, make_dataset, model_flops  # noqa: E402

SHAPES = {
    # ArmoRM-Llama3-8B-v0.1's published shape.
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128257),
    # For a dry run of this script on a CPU.
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128257),
}
H100_BF16_DENSE_TFLOPS = 989.0
T0 = time.perf_counter()


def log(msg):
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


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

    shards, weight_map = [], {}

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


class Reference:
    """transformers' LlamaModel (sdpa) + ArmoRM's head, on `device` in `dtype`."""

    def __init__(self, model_dir: Path, device, dtype):
        from safetensors.torch import load_file
        from transformers import AutoTokenizer, LlamaConfig, LlamaModel
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
        self.model.rotary_emb = type(self.model.rotary_emb)(config=cfg)
        self.model.to(device).eval()
        self.device, self.dtype = device, dtype
        self.tok = AutoTokenizer.from_pretrained(str(model_dir))
        self.pattern = self.tok.encode(GATING_TEXT, add_special_tokens=False)

    def encode(self, row):
        msgs = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
        ids = self.tok.apply_chat_template(msgs, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def gate(self, ids):
        n = len(self.pattern)
        return next(j for j in range(len(ids) - n, -1, -1) if ids[j:j + n] == self.pattern)

    def scores(self, last, gate):
        w = self.head
        rewards = last.float() @ w["regression_layer.weight"].T
        x = gate.float()
        for i in range(4):
            x = x @ w[f"gating.layers.{i}.weight"].T + w[f"gating.layers.{i}.bias"]
            x = torch.relu(x) if i < 3 else x
        gating = torch.softmax(x / 10, dim=-1) * w["gating.logit_scale"][0]
        return (rewards * (gating @ w["reward_transform_matrix"].T)).sum(-1)

    def run(self, encoded, batch_size):
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        out = [None] * len(encoded)
        with torch.inference_mode():
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                t = max(len(encoded[i]) for i in idx)
                ids = torch.zeros((len(idx), t), dtype=torch.long)
                mask = torch.zeros((len(idx), t), dtype=torch.long)
                for r, i in enumerate(idx):
                    ids[r, :len(encoded[i])] = torch.tensor(encoded[i])
                    mask[r, :len(encoded[i])] = 1
                hidden = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
                rows = torch.arange(len(idx), device=self.device)
                last = hidden[rows, torch.tensor([len(encoded[i]) - 1 for i in idx], device=self.device)]
                gate = hidden[rows, torch.tensor([self.gate(encoded[i]) for i in idx], device=self.device)]
                for i, sc in zip(idx, self.scores(last, gate).tolist()):
                    out[i] = sc
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return out


def run_armorm(binary, model_dir, data, device, dtype, extra=()):
    out = Path(tempfile.mkdtemp()) / "out.jsonl"
    cmd = [str(binary), "score", str(data), "--model", str(model_dir), "-o", str(out), "--device", device,
           "--dtype", dtype, *extra]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"armorm failed ({' '.join(cmd)}):\n{p.stderr}")
    summary = [l for l in p.stderr.splitlines() if "scored" in l][-1]
    seconds = float(summary.split(" in ")[1].split(" s")[0])
    scores = [json.loads(l)["score"] for l in out.read_text().splitlines()]
    return seconds, wall, scores, summary


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--armorm", required=True)
    ap.add_argument("--work", default="/tmp/armorm-gpu-check")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="8b", choices=SHAPES)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--check-rows", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8, help="transformers' padded batch size")
    ap.add_argument("--max-batch-tokens", type=int, default=32768, help="armorm's token budget")
    args = ap.parse_args()
    device = torch.device(args.device)
    armorm_device = "cuda:0" if device.type == "cuda" else "cpu"
    work = Path(args.work)
    model_dir = work / f"model-{args.shape}"
    if not (model_dir / "config.json").exists():
        log(f"generating random {args.shape} weights ...")
        generate(model_dir, SHAPES[args.shape], device)
    log("weights ready")
    data = work / "rows.jsonl"
    make_dataset(data, args.rows, seed=1)
    rows = [json.loads(l) for l in data.read_text().splitlines()]
    check = work / "check.jsonl"
    check.write_text("".join(json.dumps(r) + "\n" for r in rows[: args.check_rows]))
    cfg = json.loads((model_dir / "config.json").read_text())
    budget = ["--max-batch-tokens", str(args.max_batch_tokens)]

    # 1. Parity in f32 on a few rows.
    _, _, a32, _ = run_armorm(args.armorm, model_dir, check, armorm_device, "f32", budget)
    log("armorm f32 check rows scored")
    ref = Reference(model_dir, device, torch.float32)
    enc_check = [ref.encode(r) for r in rows[: args.check_rows]]
    r32 = ref.run(enc_check, args.batch_size)
    del ref
    torch.cuda.empty_cache() if device.type == "cuda" else None
    d32 = max(abs(a - b) for a, b in zip(a32, r32))
    log(f"f32 parity on {len(a32)} rows: max |diff| {d32:.2e}")

    # 2. bf16 timing on all rows, armorm first (its own process), then transformers.
    secs, wall, a16, summary = run_armorm(args.armorm, model_dir, data, armorm_device, "bf16", budget)
    log(f"armorm bf16: {summary}  (wall with load {wall:.1f}s)")
    ref = Reference(model_dir, device, torch.bfloat16)
    encoded = [ref.encode(r) for r in rows]
    ref.run(encoded[: args.batch_size], args.batch_size)  # warm-up
    t = time.perf_counter()
    r16 = ref.run(encoded, args.batch_size)
    ref_secs = time.perf_counter() - t
    log("transformers bf16 done")

    lens = [len(e) for e in encoded]
    tokens = sum(lens)
    flops = model_flops(cfg, lens)
    peak = matmul_tflops(device, torch.bfloat16)
    pearson = float(np.corrcoef(np.array(a16), np.array(r16))[0, 1])
    d16 = max(abs(a - b) for a, b in zip(a16, r16))
    print()
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; shape {args.shape}; "
          f"{len(rows)} rows, {tokens} tokens, longest {max(lens)}; {flops / 1e15:.2f} PFLOP useful")
    print(f"measured bf16 matmul: {peak:.0f} TFLOP/s (datasheet dense: {H100_BF16_DENSE_TFLOPS:.0f})")
    print(f"{'pipeline':34} {'seconds':>8} {'tokens/s':>9} {'MFU(datasheet)':>15} {'MFU(measured)':>14}")
    for label, s in [(f"armorm bf16 (budget {args.max_batch_tokens})", secs),
                     (f"transformers bf16 sdpa, sorted x{args.batch_size}", ref_secs)]:
        tf = flops / s / 1e12
        print(f"{label:34} {s:8.2f} {tokens / s:9.0f} {tf / H100_BF16_DENSE_TFLOPS:14.1%} {tf / peak:13.1%}")
    print(f"armorm / transformers: {ref_secs / secs:.2f}x")
    print(f"parity: f32 max |diff| {d32:.2e} on {len(a32)} rows (must be <= 1e-3); "
          f"bf16 Pearson {pearson:.5f}, max |diff| {d16:.3f} on {len(rows)} rows")
    ok = d32 <= 1e-3 and pearson >= 0.99
    print("GPU CHECK OK" if ok else "GPU CHECK FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
