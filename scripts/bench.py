#!/usr/bin/env python3
"""Side-by-side throughput benchmark: `armorm score` against the transformers pipelines people run.

Run through scripts/bench.sh, which builds armorm and sets up the pinned Python environment. In one
invocation, on the same machine and the same number of threads, it

  1. generates (once) a mid-size random ArmoRM: hidden 1024, 8 layers, 16 heads / 4 KV heads,
     intermediate 2816, the real Llama-3 vocabulary (fixtures/generate.py --bench-only);
  2. generates a 128-row dataset with log-normal prompt and response lengths (~40,000 tokens);
  3. measures the machine's f32 matrix-multiply rate (PyTorch/MKL, a shape of this model's MLP);
  4. runs each armorm binary given (f32, and bf16 for the first) and three transformers pipelines
     (sorted padded batches of 8; unsorted padded batches of 8, as rewardbench does; one row at a time,
     as the model card does), all f32 with the same head math;
  5. checks armorm's scores against the sorted transformers pipeline (max |diff| <= 1e-3) and bf16
     against f32 (Pearson >= 0.999), and prints tokens/s, ratios and the share of the matmul roofline;
  6. scores a generated 10,000-row and 1,000,000-row JSONL with the tiny fixture model and prints both
     peak RSS figures (flat memory: the large run must stay within 1.5x of the small one);
  7. checks that pyarrow can filter armorm's Parquet output and write it back (alone:
     `bench.py --check-parquet FILE`);
  8. best-of-8 (issue 12; alone: `--only-best-of-8`): a generated set of 8 answers per prompt
     (~500-token prompts, ~150-token answers, rows shuffled), armorm with prefix sharing against armorm
     without it and against transformers' sorted batches; prints the model FLOPs of each way (armorm's
     tokens computed, padding included, from its summary lines), the time ratios and the score checks.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
GATING_TEXT = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
WORDS = ("time person year way day thing man world life hand part child eye woman place work week case "
         "point government company number group problem fact be have do say get make go know take see come "
         "think look want give use find tell ask seem feel try leave call good new first last long great "
         "little own other old right big high different small large next early young important few public "
         "bad same able to of in for on with at by from up about into over after beneath under above the "
         "and a that I it not he as you this but his they her she or an will my one all would there their "
         "reward model score gradient attention token batch matrix vector kernel memory cache latency").split()


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- data


def make_dataset(path: Path, rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for i in range(rows):
            p = int(min(900, max(3, rng.lognormal(4.1, 0.9))))
            r = int(min(1100, max(3, rng.lognormal(4.8, 0.8))))
            prompt = " ".join(rng.choice(WORDS, p)) + "?"
            response = " ".join(rng.choice(WORDS, r)) + "."
            f.write(json.dumps({"id": f"r{i}", "prompt": prompt, "response": response}) + "\n")


def make_best_of_n(path: Path, prompts: int, n: int = 8, seed: int = 1):
    """`n` answers per prompt, rows shuffled so that the answers to one prompt lie apart: prompts of
    400-600 words and answers of 95-195, i.e. ~500 and ~150 tokens with the chat template and the end
    token (the benchmark prints the measured means)."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(prompts):
        prompt = " ".join(rng.choice(WORDS, int(rng.integers(400, 601)))) + "?"
        for a in range(n):
            response = " ".join(rng.choice(WORDS, int(rng.integers(95, 196)))) + "."
            rows.append({"id": f"p{p}-a{a}", "prompt": prompt, "response": response})
    with path.open("w") as f:
        for i in rng.permutation(len(rows)):
            f.write(json.dumps(rows[i]) + "\n")


def make_rss_dataset(path: Path, rows: int):
    with path.open("w") as f:
        for i in range(rows):
            f.write(json.dumps({"id": i, "prompt": f"Question {i % 977}: what is {i % 13} + {i % 7}?",
                                "response": f"It is {i % 13 + i % 7}."}) + "\n")


# ---------------------------------------------------------------- transformers reference


class Tokens:
    """The chat template and gating-token search, as ArmoRM's model card does them (also used by
    gpu_check.py)."""

    def __init__(self, model_dir: Path):
        from transformers import AutoTokenizer
        self.tok = AutoTokenizer.from_pretrained(str(model_dir))
        self.pattern = self.tok.encode(GATING_TEXT, add_special_tokens=False)

    def encode(self, row):
        msgs = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
        ids = self.tok.apply_chat_template(msgs, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def gate(self, ids):
        n = len(self.pattern)
        for j in range(len(ids) - n, -1, -1):
            if ids[j:j + n] == self.pattern:
                return j
        raise ValueError("Token pattern not found in the list.")


class Reference(Tokens):
    """transformers' LlamaModel + ArmoRM's head in f32, the way a careful user writes it."""

    def __init__(self, model_dir: Path, threads: int):
        import torch
        from safetensors.torch import load_file
        from transformers import LlamaConfig, LlamaModel

        torch.set_num_threads(threads)
        self.torch = torch
        cfg = LlamaConfig.from_pretrained(str(model_dir))
        cfg.pad_token_id = None  # the pad id may lie past the embedding; padding uses id 0 + the mask
        self.model = LlamaModel(cfg).float().eval()
        index = json.loads((model_dir / "model.safetensors.index.json").read_text())
        weights = {}
        for shard in sorted(set(index["weight_map"].values())):
            weights.update(load_file(str(model_dir / shard)))
        self.model.load_state_dict({k[6:]: v.float() for k, v in weights.items() if k.startswith("model.")},
                                   strict=False)
        raw = json.loads((model_dir / "config.json").read_text())
        self.n_hidden = raw.get("gating_n_hidden", 3)
        self.temperature = raw.get("gating_temperature", 10)
        self.head = {k: v.float() for k, v in weights.items() if not k.startswith("model.")}
        Tokens.__init__(self, model_dir)

    def head_scores(self, last, gate):
        torch, w = self.torch, self.head
        rewards = last @ w["regression_layer.weight"].T
        x = gate
        for i in range(self.n_hidden + 1):
            x = x @ w[f"gating.layers.{i}.weight"].T + w[f"gating.layers.{i}.bias"]
            if i < self.n_hidden:
                x = torch.relu(x)
        gating = torch.softmax(x / self.temperature, dim=-1) * w["gating.logit_scale"][0]
        coefficients = gating @ w["reward_transform_matrix"].T
        return (rewards * coefficients).sum(-1)

    def run(self, encoded, order, batch_size):
        """Scores rows in `order`, `batch_size` at a time, right-padded with an attention mask."""
        torch = self.torch
        scores = [None] * len(encoded)
        with torch.inference_mode():
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                t = max(len(encoded[i]) for i in idx)
                ids = torch.zeros((len(idx), t), dtype=torch.long)
                mask = torch.zeros((len(idx), t), dtype=torch.long)
                for r, i in enumerate(idx):
                    ids[r, :len(encoded[i])] = torch.tensor(encoded[i])
                    mask[r, :len(encoded[i])] = 1
                hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
                rows = torch.arange(len(idx))
                last = hidden[rows, torch.tensor([len(encoded[i]) - 1 for i in idx])]
                gate = hidden[rows, torch.tensor([self.gate(encoded[i]) for i in idx])]
                for i, sc in zip(idx, self.head_scores(last, gate).tolist()):
                    scores[i] = sc
        return scores


def matmul_rate(threads: int, m=2048, k=1024, n=2816, reps=8):
    import torch
    torch.set_num_threads(threads)
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(2):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * m * k * n * reps / (time.perf_counter() - t) / 1e9


def model_flops(cfg, lens):
    """Useful FLOPs of the backbone for rows of these lengths (no padding; full-square attention)."""
    h, i, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    d = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d
    per_token = 2 * L * (h * h * 2 + 2 * h * kv + 3 * h * i)
    return sum(per_token * t + 4 * L * t * t * h for t in lens)


def required_flops(cfg, lens, picks=2):
    """The FLOPs a score requires, for rows of these lengths: causal attention (each query against the
    keys up to it), and the last layer only where it is read (the last token and the gating token),
    with its keys and values for every token. `model_flops` counts more (full-square attention, every
    layer at every token): the count issue 10's first MFU figures used."""
    h, i, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    d = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d
    q_o, k_v, mlp = 2 * 2 * h * h, 2 * 2 * h * kv, 2 * 3 * h * i
    total = 0
    for t in lens:
        # Per layer: the projections, and 4·h FLOPs (QKᵀ and PV) per query-key pair, t(t+1)/2 pairs.
        total += (L - 1) * (t * (q_o + k_v + mlp) + 2 * h * t * (t + 1))
        total += t * k_v + picks * (q_o + mlp + 4 * h * t)
    return total


def sharing_flops(cfg, groups):
    """Backbone FLOPs (causal attention: each query against the keys up to it) of `groups`, each
    (prefix tokens, [response tokens...]): every row run whole, and each prefix once with the responses
    against its cached keys and values. The last layer's work at the picks alone is left out of both."""
    h, i, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    d = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d
    per_token = 2 * L * (h * h * 2 + 2 * h * kv + 3 * h * i)
    pair = 4 * L * h  # one query against one key: q·k and p·v over every head

    def causal(t, past=0):
        return pair * (t * past + t * (t + 1) // 2)

    whole = shared = 0
    for prefix, responses in groups:
        for r in responses:
            whole += per_token * (prefix + r) + causal(prefix + r)
            shared += per_token * r + causal(r, prefix)
        shared += per_token * prefix + causal(prefix)
    return whole, shared


# ---------------------------------------------------------------- armorm


def run_armorm(binary, model_dir, data, threads, dtype="f32", extra=()):
    out = Path(tempfile.mkdtemp()) / "out.jsonl"
    cmd = [str(binary), "score", str(data), "--model", str(model_dir), "-o", str(out), "--device", "cpu",
           "--dtype", dtype, "--threads", str(threads), *extra]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"armorm failed: {p.stderr}")
    summary = [l for l in p.stderr.splitlines() if "scored" in l][-1]
    seconds = float(summary.split(" in ")[1].split(" s")[0])
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    return seconds, {r["id"]: r["score"] for r in rows}, summary


def computed_tokens(summary):
    """Tokens armorm's model computed, padding included, from its summary line."""
    tokens = int(summary.split(" rows, ")[1].split(" tokens")[0])
    overhead = float(summary.split("padding overhead ")[1].split("%")[0])
    saved = int(summary.split("prefix sharing saved ")[1].split(" ")[0]) if "sharing saved" in summary else 0
    return (tokens - saved) * (1 + overhead / 100)


def best_of_8(binary, model_dir, ref, cfg, work, prompts, threads):
    """Issue 12's benchmark; returns whether the scores agree."""
    data = work / "best-of-8.jsonl"
    make_best_of_n(data, prompts)
    rows = [json.loads(l) for l in data.read_text().splitlines()]
    ids = [r["id"] for r in rows]
    encoded = [ref.encode(r) for r in rows]
    lens = [len(e) for e in encoded]
    tokens = sum(lens)
    by_prompt = {}
    for r, e in zip(rows, encoded):
        prefix = ref.gate(e) + len(ref.pattern)
        by_prompt.setdefault(r["prompt"], (prefix, []))[1].append(len(e) - prefix)
    whole_flops, shared_flops = sharing_flops(cfg, by_prompt.values())
    log(f"best-of-8: {len(rows)} rows, {len(by_prompt)} prompts, {tokens} tokens")

    results = []
    t = time.perf_counter()
    ref_scores = dict(zip(ids, ref.run(encoded, sorted(range(len(rows)), key=lambda i: lens[i]), 8)))
    results.append(("transformers sorted, batches of 8", time.perf_counter() - t, ref_scores, None))
    for label, extra in (("armorm, --prefix-sharing off", ["--prefix-sharing", "off"]),
                         ("armorm, --prefix-sharing auto", ["--prefix-sharing", "auto"])):
        seconds, scores, summary = run_armorm(binary, model_dir, data, threads, extra=extra)
        results.append((label, seconds, scores, summary))
        log(f"{label}: {seconds:.2f} s")

    print(f"\nbest-of-8: {len(rows)} rows ({len(by_prompt)} prompts x 8 answers, shuffled), {tokens} tokens; "
          f"mean prompt {np.mean([p for p, _ in by_prompt.values()]):.0f} tokens, mean answer "
          f"{np.mean([a for _, r in by_prompt.values() for a in r]):.0f}")
    print(f"model FLOPs: every row whole {whole_flops / 1e12:.3f} T, prompts shared {shared_flops / 1e12:.3f} T: "
          f"{whole_flops / shared_flops:.2f}x fewer")
    off, on = results[1], results[2]
    computed = computed_tokens(off[3]), computed_tokens(on[3])
    print(f"armorm tokens computed (padding included): off {computed[0]:.0f}, auto {computed[1]:.0f}: "
          f"{computed[0] / computed[1]:.2f}x fewer")
    print(f"{'pipeline':42} {'seconds':>8} {'tokens/s':>9} {'vs sorted tf':>12} {'vs off':>7} {'max|diff|':>10}")
    for label, seconds, scores, _ in results:
        diff = max(abs(scores[i] - ref_scores[i]) for i in ids)
        print(f"{label:42} {seconds:8.2f} {tokens / seconds:9.0f} {results[0][1] / seconds:11.2f}x "
              f"{off[1] / seconds:6.2f}x {diff:10.2e}")
    shared_vs_off = max(abs(on[2][i] - off[2][i]) for i in ids)
    print(f"armorm auto vs off: max |score diff| {shared_vs_off:.2e} (must be <= 1e-5); "
          f"sharing {off[1] / on[1]:.2f}x faster")
    ok = shared_vs_off <= 1e-5 and max(abs(on[2][i] - ref_scores[i]) for i in ids) <= 1e-3
    print("best-of-8 scores agree" if ok else "BEST-OF-8 SCORES DISAGREE")
    return ok


def check_parquet(path: Path):
    """pyarrow reads armorm's Parquet, filters it with a boolean mask and writes the result back: the
    two steps that failed on Arrow string_view columns ("no kernel matching input types", "Slicing not
    implemented for StringView"). Raises on any failure; returns the number of rows kept."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    # Every row passes (null scores included): the filter itself is what must work.
    mask = pc.fill_null(pc.greater_equal(table["score"], pc.min(table["score"])), True)
    kept = table.filter(mask)
    if kept.num_rows != table.num_rows:
        raise SystemExit(f"{path}: the filter kept {kept.num_rows} of {table.num_rows} rows")
    kept = kept.slice(0, max(1, kept.num_rows // 2))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "filtered.parquet"
        pq.write_table(kept, out)
        back = pq.read_table(out)
    if not back.equals(kept):
        raise SystemExit(f"{path}: the written-back table differs from the filtered one")
    odd = [f"{f.name}: {f.type}" for f in table.schema
           if pa.types.is_string_view(f.type) or pa.types.is_large_string(f.type)
           or pa.types.is_large_list(f.type)]
    if odd:
        raise SystemExit(f"{path}: columns in view or large types: {', '.join(odd)}")
    return kept.num_rows


def peak_rss(cmd):
    """Peak resident memory of an armorm run, in MiB, as its summary line reports it (Linux VmHWM).
    getrusage's maxrss would not do: it keeps the memory of this Python process from before the exec."""
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {p.stderr}")
    summary = [l for l in p.stderr.splitlines() if "scored" in l][-1]
    return float(summary.split("peak memory ")[1].split(" MiB")[0]), summary


# ---------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--armorm", action="append",
                    help="LABEL=PATH of an armorm binary; repeat for several builds")
    ap.add_argument("--check-parquet", metavar="FILE",
                    help="only check that pyarrow can filter and write back this armorm Parquet file")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--work", default=str(ROOT / "target" / "bench"))
    ap.add_argument("--skip-rss", action="store_true", help="skip the 1,000,000-row memory check")
    ap.add_argument("--skip-slow-reference", action="store_true",
                    help="skip the unsorted and one-at-a-time transformers pipelines")
    ap.add_argument("--best-of-8-prompts", type=int, default=16,
                    help="prompts in the best-of-8 set (8 rows each); 0 skips it")
    ap.add_argument("--only-best-of-8", action="store_true", help="run the best-of-8 benchmark alone")
    args = ap.parse_args()
    if args.check_parquet:
        rows = check_parquet(Path(args.check_parquet))
        print(f"pyarrow filtered and wrote back {args.check_parquet} ({rows} rows)")
        return
    if not args.armorm:
        ap.error("--armorm is required")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    # LABEL=PATH, or a bare PATH (labelled by its file name).
    builds = [tuple(a.split("=", 1)) if "=" in a else (Path(a).name, a) for a in args.armorm]

    model_dir = work / "model"
    if not (model_dir / "config.json").exists():
        log("generating the benchmark model ...")
        subprocess.run([sys.executable, str(ROOT / "fixtures" / "generate.py"), "--bench-only", str(model_dir)],
                       check=True)
    cfg = json.loads((model_dir / "config.json").read_text())
    ref = Reference(model_dir, args.threads)
    if args.only_best_of_8:
        ok = best_of_8(builds[0][1], model_dir, ref, cfg, work, args.best_of_8_prompts, args.threads)
        sys.exit(0 if ok else 1)
    data = work / "bench.jsonl"
    make_dataset(data, args.rows)
    rows = [json.loads(l) for l in data.read_text().splitlines()]

    encoded = [ref.encode(r) for r in rows]
    lens = [len(e) for e in encoded]
    tokens = sum(lens)
    flops = model_flops(cfg, lens)
    rate = matmul_rate(args.threads)
    log(f"dataset: {len(rows)} rows, {tokens} tokens, longest {max(lens)}; f32 matmul {rate:.0f} GFLOP/s")

    results = []  # (label, seconds, scores)

    def add(label, seconds, scores):
        results.append((label, seconds, scores))
        log(f"{label}: {seconds:.2f} s, {tokens / seconds:.0f} tokens/s")

    ids = [r["id"] for r in rows]
    order_sorted = sorted(range(len(rows)), key=lambda i: lens[i])
    t = time.perf_counter()
    ref_sorted = ref.run(encoded, order_sorted, 8)
    add("transformers sorted, batches of 8", time.perf_counter() - t, dict(zip(ids, ref_sorted)))
    if not args.skip_slow_reference:
        t = time.perf_counter()
        s = ref.run(encoded, list(range(len(rows))), 8)
        add("transformers unsorted, batches of 8", time.perf_counter() - t, dict(zip(ids, s)))
        t = time.perf_counter()
        s = ref.run(encoded, list(range(len(rows))), 1)
        add("transformers one row at a time", time.perf_counter() - t, dict(zip(ids, s)))

    for n, (label, binary) in enumerate(builds):
        seconds, scores, summary = run_armorm(binary, model_dir, data, args.threads)
        add(f"armorm {label} f32", seconds, scores)
        if n == 0:
            seconds16, scores16, _ = run_armorm(binary, model_dir, data, args.threads, "bf16")
            add(f"armorm {label} bf16", seconds16, scores16)

    reference = dict(zip(ids, ref_sorted))
    ref_time = results[0][1]
    print()
    print(f"machine: {os.cpu_count()} cores, {args.threads} threads; f32 matmul (PyTorch/MKL, "
          f"{2048}x{1024}x{2816}): {rate:.0f} GFLOP/s")
    print(f"dataset: {len(rows)} rows, {tokens} tokens (longest {max(lens)}), {flops / 1e12:.2f} TFLOP useful")
    print()
    print(f"{'pipeline':42} {'seconds':>8} {'tokens/s':>9} {'vs sorted tf':>12} {'roofline':>9} {'max|diff|':>10}")
    ok = True
    for label, seconds, scores in results:
        diff = max(abs(scores[i] - reference[i]) for i in ids)
        share = flops / seconds / 1e9 / rate
        print(f"{label:42} {seconds:8.2f} {tokens / seconds:9.0f} {ref_time / seconds:11.2f}x {share:8.0%} {diff:10.2e}")
        if label.startswith("armorm") and label.endswith("f32") and diff > 1e-3:
            ok = False
    bf16 = [(l, s) for l, _, s in results if l.endswith("bf16")]
    f32 = [(l, s) for l, _, s in results if l.startswith("armorm") and l.endswith("f32")]
    if bf16 and f32:
        a = np.array([f32[0][1][i] for i in ids])
        b = np.array([bf16[0][1][i] for i in ids])
        pearson = float(np.corrcoef(a, b)[0, 1])
        print(f"\nbf16 vs f32 score Pearson: {pearson:.5f} (must be >= 0.999)")
        ok &= pearson >= 0.999
    print("scores: armorm f32 within 1e-3 of transformers" if ok else "SCORES DISAGREE")
    if args.best_of_8_prompts > 0:
        ok &= best_of_8(builds[0][1], model_dir, ref, cfg, work, args.best_of_8_prompts, args.threads)

    label, binary = builds[0]
    scored = work / "bench-scores.parquet"
    subprocess.run([str(binary), "score", str(data), "--model", str(ROOT / "fixtures" / "tiny-armorm"), "-o",
                    str(scored), "--top-k", "3", "-q", "--overwrite"], check=True)
    print(f"pyarrow filter + write back of armorm's Parquet: {check_parquet(scored)} rows")

    if not args.skip_rss:
        label, binary = builds[0]
        small, large = work / "rss-10k.jsonl", work / "rss-1m.jsonl"
        make_rss_dataset(small, 10_000)
        if not large.exists():
            make_rss_dataset(large, 1_000_000)
        tiny = ROOT / "fixtures" / "tiny-armorm"
        rss = []
        for path in (small, large):
            cmd = [str(binary), "score", str(path), "--model", str(tiny), "-o", str(work / "rss-out.parquet"),
                   "--threads", str(args.threads)]
            mib, summary = peak_rss(cmd)
            rss.append(mib)
            print(f"peak RSS {path.name}: {mib:.0f} MiB  ({summary.replace('armorm: ', '')})")
        print(f"peak RSS ratio 1M / 10k rows: {rss[1] / rss[0]:.2f} (must be <= 1.5)")
        ok &= rss[1] / rss[0] <= 1.5
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
