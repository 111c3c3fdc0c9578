"""Benchmark: the LM's activation extraction and training throughput (paper-shaped model).

    .venv/bin/python bench/lm.py                     # d 128/512, T 1024, fp32, 2 threads
    .venv/bin/python bench/lm.py --rounds 10 --train_steps 8
    .venv/bin/python bench/lm.py --device cuda       # on a GPU machine

(a) Activation extraction, the real code path (`Lm.mlp_acts`) on random weights, float32,
8 contexts of 1024 tokens per batch, 200 positions per context sampled uniformly without
replacement (so the batch's last position is ~1023 and the context is barely cut: the gain
comes from computing queries, attention, c_proj and the MLP only at the sampled rows):
  seed method  every position up to the GELU (no c_proj, no unembedding), then gather the
               sampled rows (the seed's get_gelu_acts / HookedGPT): `mlp_acts(idx)` + gather
  ours         `mlp_acts(idx, positions)`
timed alternately in rounds on the same batches, so load from other processes hits both.
DESIGN.md reference on this machine: the seed's own code 36.7 k vectors/s; computing only
what the sampled rows need reached 2.3x.

(b) Training: tokens/s of `mono.train_lm.train` (the real loop, on synthetic token shards
of 1024-token contexts written to a temp dir) and model FLOPs utilisation; then the same
loop with the unfused loss (F.cross_entropy on whole (N, V) logits) in place of the chunked
`mono.lm.linear_cross_entropy`, for the ratio. FLOPs per token
follow nanoGPT's `estimate_mfu`: 6·N + 12·L·D·T, N = parameters without the position
embedding (the tied unembedding counted once: its matmul is most of the work), plus the
attention term (L layers, D = d_model, T context). Peak: the best of a few 4096^3 float32
matmuls (and bfloat16 ones when the CPU has bf16 hardware; otherwise a 1024^3 probe shows
the fallback's speed) in the same process.
"""

import argparse
import logging
import statistics
import tempfile
import time

import numpy as np
import torch

import mono.lm
from mono import store, train_lm
from mono.config import PRESETS, with_overrides
from mono.lm import Lm


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(dtype: torch.dtype, n: int, reps: int, device: torch.device) -> float:
    """Best FLOP/s of an (n, n) @ (n, n) matmul over reps calls."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def peaks(device: torch.device) -> dict[str, float]:
    out = {"float32": matmul_peak(torch.float32, 4096, 3, device)}
    has_bf16 = device.type == "cuda" or torch.cpu._is_avx512_bf16_supported() \
        or torch.cpu._is_amx_tile_supported()
    probe = matmul_peak(torch.bfloat16, 1024, 1, device)
    out["bfloat16"] = matmul_peak(torch.bfloat16, 4096, 3, device) if has_bf16 else probe
    out["bf16_note"] = "4096^3" if has_bf16 else "1024^3 probe: no bf16 hardware on this CPU"
    return out


def extraction(device: torch.device, rounds: int, batch: int, T: int, P: int) -> dict:
    torch.manual_seed(0)
    lm = Lm(PRESETS["paper"].lm).to(device).eval()
    H = lm.cfg.d_mlp
    batches = []
    for _ in range(2):
        idx = torch.randint(0, 50257, (batch, T), device=device)                # (B, T)
        pos = torch.stack([torch.randperm(T, device=device)[:P] for _ in range(batch)])  # (B, P)
        batches.append((idx, pos))

    def seed_method(idx, pos):
        return lm.mlp_acts(idx).gather(1, pos[..., None].expand(-1, -1, H))    # (B, P, H)

    def ours(idx, pos):
        return lm.mlp_acts(idx, pos)                                             # (B, P, H)

    for idx, pos in batches:  # warm-up, and the two agree
        torch.testing.assert_close(ours(idx, pos), seed_method(idx, pos), rtol=1e-5, atol=1e-6)
    times = {"seed method": [], "ours": []}
    for r in range(rounds):
        idx, pos = batches[r % 2]
        for name, fn in (("seed method", seed_method), ("ours", ours)) if r % 2 == 0 else \
                (("ours", ours), ("seed method", seed_method)):
            sync(device)
            t = time.perf_counter()
            fn(idx, pos)
            sync(device)
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"vectors_per_batch": batch * P, "median_s": med,
            "vectors_per_s": {k: batch * P / v for k, v in med.items()},
            "last_pos": [int(p.max()) for _, p in batches]}


def unfused_cross_entropy(h, W, targets, chunk=0):
    """The plain loss `linear_cross_entropy` replaces: (N, V) logits, autograd backward."""
    return torch.nn.functional.cross_entropy(h @ W.T, targets, ignore_index=-1)


def training(device: torch.device, steps: int, batch: int, T: int, dtype: str,
             loss_fn=None) -> dict:
    """tokens/s of the real loop; loss_fn replaces mono.lm.linear_cross_entropy (unfused)."""
    fused = mono.lm.linear_cross_entropy
    mono.lm.linear_cross_entropy = loss_fn or fused
    try:
        return _training(device, steps, batch, T, dtype)
    finally:
        mono.lm.linear_cross_entropy = fused


def _training(device: torch.device, steps: int, batch: int, T: int, dtype: str) -> dict:
    cfg = PRESETS["paper"]
    with tempfile.TemporaryDirectory() as d:
        rng, splits = np.random.default_rng(0), {}
        for split, rows in (("train", 64), ("val", 4)):
            name = "part-00000.parquet"
            store.write_table_atomic(store.join(store.Layout(d).tokens(split), name),
                                     store.token_table(np.arange(rows),
                                                       rng.integers(0, 50257, (rows, T))))
            splits[split] = {"rows": rows, "files": [{"name": name, "first": 0, "rows": rows}]}
        store.write_json(store.Layout(d).tokens_manifest, {"ctx_len": T, "splits": splits})
        half = max(1, steps // 2)
        cfg = with_overrides(cfg, out=d, train_lm={
            "max_iters": 2 * half, "batch_size": batch, "grad_accum": 1, "warmup_iters": 1,
            "log_interval": half, "eval_interval": 2 * half, "eval_iters": 1, "dtype": dtype,
            "use_gpu": device.type == "cuda"})
        logs = []
        train_lm.train(cfg, on_log=logs.append, device=device)
    lm = Lm(cfg.lm)
    flops_per_token = 6 * lm.num_params() + 12 * cfg.lm.n_layer * cfg.lm.d_model * T
    return {"tokens_per_s": logs[-1]["tokens_per_s"], "flops_per_token": flops_per_token,
            "steps_timed": half, "tokens_per_step": batch * T}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=8, help="alternating extraction rounds")
    ap.add_argument("--contexts", type=int, default=8, help="contexts per extraction batch")
    ap.add_argument("--positions", type=int, default=200, help="sampled positions per context")
    ap.add_argument("--train_steps", type=int, default=6, help="training steps (half timed)")
    ap.add_argument("--train_batch", type=int, default=4, help="contexts per training step")
    ap.add_argument("--dtype", default="auto", help="training autocast dtype")
    ap.add_argument("--only", choices=("extract", "train"), help="run one part")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    device, T = torch.device(args.device), 1024
    print(f"torch {torch.__version__}, {args.threads} threads, device {device}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")

    if args.only != "extract":
        pk = peaks(device)
    if args.only != "train":
        report_extraction(extraction(device, args.rounds, args.contexts, T, args.positions),
                          args, T)
    if args.only != "extract":
        tr = training(device, args.train_steps, args.train_batch, T, args.dtype)
        unfused = training(device, args.train_steps, args.train_batch, T, args.dtype,
                           unfused_cross_entropy)
        report_training(tr, pk, matmul_peak(torch.float32, 4096, 3, device), args, T)
        ratio = tr["tokens_per_s"] / unfused["tokens_per_s"]
        print(f"  unfused cross-entropy step  {unfused['tokens_per_s']:12,.0f} tokens/s: the "
              f"chunked linear_cross_entropy is {ratio:.2f}x")


def report_extraction(ex: dict, args, T: int) -> None:
    v = ex["vectors_per_s"]
    print(f"\n(a) MLP activation extraction: {args.contexts} contexts x {T} tokens, "
          f"{args.positions} positions each (batch max position {ex['last_pos']}), float32, "
          f"{args.rounds} alternating rounds, medians")
    print(f"  {'method':14s} {'ms/batch':>9s} {'vectors/s':>11s} {'vs seed':>8s}")
    for name in ("seed method", "ours"):
        print(f"  {name:14s} {ex['median_s'][name] * 1e3:9.1f} {v[name]:11,.0f} "
              f"{v[name] / v['seed method']:7.2f}x")
    print("  (DESIGN.md: the seed's own code 36.7 k vectors/s on this machine, unloaded)")


def report_training(tr: dict, pk: dict, pk_end: float, args, T: int) -> None:
    achieved = tr["tokens_per_s"] * tr["flops_per_token"]
    print(f"\n(b) LM training (mono.train_lm.train, paper-shaped model, {args.train_batch} x {T}"
          f" tokens/step, dtype {args.dtype}, last {tr['steps_timed']} steps)")
    print(f"  tokens/s                    {tr['tokens_per_s']:12,.0f}")
    print(f"  FLOPs/token (6N + 12LDT)    {tr['flops_per_token']:12,.0f}")
    print(f"  achieved                    {achieved / 1e9:12.1f} GFLOP/s")
    print(f"  fp32 matmul peak 4096^3     {pk['float32'] / 1e9:12.1f} GFLOP/s (start), "
          f"{pk_end / 1e9:.1f} (end)")
    print(f"  bf16 matmul peak            {pk['bfloat16'] / 1e9:12.1f} GFLOP/s ({pk['bf16_note']})")
    print(f"  MFU vs fp32 peak            {achieved / max(pk['float32'], pk_end):12.1%}")
    if pk["bf16_note"] == "4096^3":
        print(f"  MFU vs bf16 peak            {achieved / pk['bfloat16']:12.1%}")
    else:
        print("  MFU vs bf16 peak                     n/a (no bf16 hardware: training runs fp32)")


if __name__ == "__main__":
    main()
