"""Stage 2: train the one-layer LM on the token shards (nanoGPT's loop, as the seed's).

Reads <out>/tokens/{train,val} and its manifest. Writes <out>/lm/ through `store.save_lm`
(cfg.json, model.safetensors, train_state.pt, metrics.json) at every eval and at the end,
from rank 0; under Ray Train the same files are also reported as the run's checkpoints.

Recipe (seed_spec.md §2, nanoGPT `train.py`): AdamW with the config's betas and weight decay
on >= 2-D tensors only (matrices and embeddings, not LayerNorm gains), linear warmup then
cosine decay to min_lr at max_iters (`get_lr`), gradient accumulation, global grad-norm
clipping, bf16 autocast where it pays (`autocast_dtype`).

Data. A training example is a random context row of the train split; its last target is
the first token of the next row: tokens.py cuts each split's concatenated token stream into
consecutive windows, so row r+1 continues row r and all T positions get a target, as the
seed's random windows of T+1 tokens did (only the split's last row lacks its last target).
Rows are drawn with replacement by a generator seeded by (seed, step, rank): a run resumed
from a checkpoint draws exactly the batches an uninterrupted run draws, so it ends with the
same weights. The validation loss uses one fixed set of val rows (all of them when they fit
in eval_iters x batch_size). Each split is read once per node into a uint16 memmap in a
local cache ($MONO_CACHE_DIR, else <tmp>/mono-cache, keyed by the token manifest), so the
paper's 18 GB train split is neither held in RAM per worker nor re-read from storage.

Baselines, computed once and logged at the start, in nats per target over the very val
targets the val loss is computed on (all of the val split when it fits in eval_iters x
batch_size contexts):
  unigram_entropy  entropy of the val split's own unigram distribution: the best any
                   context-free predictor can do on val ("the unigram-entropy baseline of
                   the val split"); the LM must get below it to have learned context.
  unigram_xent     cross-entropy of val under the train split's unigram distribution with
                   add-one smoothing over the vocabulary: what a fitted unigram model gets.

`train(cfg)` is the loop in plain torch in one process (tests, benchmarks, and `run` with
num_workers = 0, the tiny preset). `run(cfg)` runs the same loop under Ray Train's
TorchTrainer on num_workers DDP ranks; a rerun with the same
out resumes from the latest checkpoint (Train V2: same RunConfig(name, storage_path) +
`ray.train.get_checkpoint()`), and plain `train` resumes from <out>/lm/train_state.pt.

Limits: data parallel only (a 6.8 M-parameter model needs nothing else); no torch.compile
(its compile time dominates the short CPU runs); each node needs local disk for the cached
splits (2 bytes per token).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from torch import Tensor, nn

from mono import cluster, reader, store, threads
from mono.config import Config, LmConfig, TrainLmConfig, from_dict
from mono.errors import UserError
from mono.lm import Lm

logger = logging.getLogger(__name__)

_TRAIN, _VAL = 1, 2  # generator stream tags: batches never collide with the val sample


# --- data ------------------------------------------------------------------------------


def cached_split(out: str, split: str) -> np.ndarray:
    """The split's token rows as a read-only (N, T) uint16 memmap from the local cache.

    The first worker of a node builds the cache file (under a file lock), the others wait
    and map the same file.
    """
    manifest = store.tokens_manifest(out)
    meta, T = manifest["splits"][split], manifest["ctx_len"]
    key = hashlib.sha256(json.dumps([store.resolve(out)[1], split, manifest],
                                    sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(reader.cache_root())
    path = cache / f"tokens-{split}-{key}.npy"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with open(f"{path}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.exists():
                _build_cache(out, split, meta, T, path)
    rows = np.load(path, mmap_mode="r")
    if rows.shape != (meta["rows"], T):
        raise ValueError(f"token cache {path} holds {rows.shape}, the manifest of {out} says "
                         f"({meta['rows']}, {T}); delete the cache file")
    return rows


def _build_cache(out: str, split: str, meta: dict, T: int, path: Path) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    rows = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint16, shape=(meta["rows"], T))
    for f in meta["files"]:
        file = store.join(store.Layout(out).tokens(split), f["name"])
        _, toks = store.table_tokens(store.read_table(file))                  # (n, T)
        if toks.shape != (f["rows"], T):
            raise ValueError(f"token shard {file} holds {toks.shape}, the manifest says "
                             f"({f['rows']}, {T})")
        rows[f["first"]:f["first"] + f["rows"]] = toks
    rows.flush()
    del rows
    os.replace(tmp, path)
    logger.info("cached %s split of %s (%d x %d tokens) in %s", split, out, meta["rows"], T, path)


def windows(rows: np.ndarray, idx: np.ndarray, device: torch.device) -> tuple[Tensor, Tensor]:
    """rows (N, T) uint16, idx (B,) row ids -> inputs x (B, T) and next-token targets y (B, T);
    the last target of row r is the first token of row r+1 (-1 = ignore for the last row)."""
    n = len(rows)
    x = rows[idx].astype(np.int64)                                        # (B, T)
    last = np.where(idx + 1 < n, rows[np.minimum(idx + 1, n - 1), 0].astype(np.int64), -1)
    y = np.concatenate([x[:, 1:], last[:, None]], axis=1)                 # (B, T)
    return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)


def batch_rows(seed: int, step: int, rank: int, n_rows: int, tc: TrainLmConfig) -> np.ndarray:
    """(grad_accum, batch_size) train row ids of one step: a function of (seed, step, rank)."""
    rng = np.random.default_rng([seed, _TRAIN, step, rank])
    return rng.integers(0, n_rows, size=(tc.grad_accum, tc.batch_size))


def val_rows(seed: int, n_rows: int, tc: TrainLmConfig) -> list[np.ndarray]:
    """The fixed validation batches: every val row when they fit, else a seeded sample."""
    want = tc.eval_iters * tc.batch_size
    idx = (np.arange(n_rows) if n_rows <= want
           else np.random.default_rng([seed, _VAL]).choice(n_rows, want, replace=False))
    return np.array_split(idx, math.ceil(len(idx) / tc.batch_size))


def unigram_baselines(train: np.ndarray, val_targets: np.ndarray, vocab_size: int) -> dict:
    """train (N, T) token rows, val_targets (M,) the ids the val loss is computed on ->
    {"unigram_entropy", "unigram_xent"} in nats per target (module docstring)."""
    counts = np.zeros(vocab_size, np.int64)
    for s in range(0, len(train), 65536):  # chunks: the memmap is never read whole
        counts += np.bincount(np.asarray(train[s:s + 65536]).ravel(), minlength=vocab_size)
    val_counts = np.bincount(val_targets, minlength=vocab_size)
    n_val = val_counts.sum()
    p = val_counts[val_counts > 0] / n_val
    q = (counts + 1) / (counts.sum() + vocab_size)  # add-one smoothing over the vocabulary
    return {"unigram_entropy": float(-(p * np.log(p)).sum()),
            "unigram_xent": float(-(val_counts * np.log(q)).sum() / n_val)}


def val_targets(rows: np.ndarray, batches: list[np.ndarray]) -> np.ndarray:
    """The next-token targets of the val batches, flattened, without ignored positions."""
    y = np.concatenate([windows(rows, b, torch.device("cpu"))[1].numpy().ravel()
                        for b in batches])
    return y[y >= 0]


# --- optimisation ----------------------------------------------------------------------


def get_lr(step: int, tc: TrainLmConfig) -> float:
    """nanoGPT's schedule: linear warmup over warmup_iters, cosine from lr to min_lr at
    max_iters."""
    if step < tc.warmup_iters:
        return tc.lr * (step + 1) / (tc.warmup_iters + 1)
    if step >= tc.max_iters:
        return tc.min_lr
    ratio = (step - tc.warmup_iters) / max(1, tc.max_iters - tc.warmup_iters)
    return tc.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (tc.lr - tc.min_lr)


def make_optimizer(model: nn.Module, tc: TrainLmConfig, device: torch.device):
    """AdamW; weight decay on >= 2-D tensors only (nanoGPT `configure_optimizers`)."""
    params = [p for p in model.parameters() if p.requires_grad]  # the tied weight once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), **fused)


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `TrainLmConfig.dtype` on device (None = plain float32).

    auto: bf16 on CUDA GPUs that support it (seed), float32 on CPU. Measured on the build
    machine (torch 2.13, 2 cores, AMD EPYC with AVX2 but no AVX-512-BF16/AMX, although
    ENVIRONMENT.md expected AMX): bf16 CPU matmuls of the unembedding's shapes ran 8-80x
    slower than float32 (no bf16 hardware: a scalar fallback), and a demo-model train step
    about 30x slower. On AMX CPUs bf16 may pay; that is unmeasured, so it stays opt-in
    (dtype=bfloat16) rather than a silent switch that also changes the numbers.
    """
    match name:
        case "float32":
            return None
        case "bfloat16":
            return torch.bfloat16
        case "auto":
            if device.type == "cuda" and torch.cuda.is_bf16_supported():
                return torch.bfloat16
            return None
        case other:
            raise ValueError(f"unknown dtype {other!r}")


@torch.no_grad()
def evaluate(model: Lm, rows: np.ndarray, batches: list[np.ndarray], device: torch.device,
             amp: torch.dtype | None) -> float:
    """Mean next-token cross-entropy over the given val batches (a token-weighted mean)."""
    total, count = 0.0, 0
    for idx in batches:
        x, y = windows(rows, idx, device)
        with _autocast(device, amp):
            logits = model(x).logits                                      # (B, T, V)
        total += float(torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1, reduction="sum"))
        count += int((y != -1).sum())
    return total / count


def _autocast(device: torch.device, amp: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()


# --- the loop --------------------------------------------------------------------------

OnEval = Callable[[dict, Callable[[str], None] | None], None]
"""on_eval(metrics, save): called on every rank at each eval; `save(dir)` (rank 0 only,
else None) writes the checkpoint files into dir."""


def train(cfg: Config, *, state: dict | None = None, on_eval: OnEval | None = None,
          on_log: Callable[[dict], None] | None = None, device: torch.device | None = None,
          rank: int = 0, world_size: int = 1, wrap: Callable[[nn.Module], nn.Module] | None = None
          ) -> dict:
    """Train (or resume) the LM of cfg; returns the final metrics (those of metrics.json).

    state: a train_state to resume from; None = <out>/lm/train_state.pt if it exists.
    on_log(metrics): rank 0, every log_interval steps (default: a progress line).
    device/rank/world_size/wrap: set by the Ray worker (wrap = DDP); one process by default.
    """
    tc, device = cfg.train_lm, device or torch.device("cpu")
    lm_dir = store.Layout(cfg.out).lm
    train_tok, val_tok = cached_split(cfg.out, "train"), cached_split(cfg.out, "val")
    _check_shapes(cfg, train_tok.shape[1])
    torch.manual_seed(cfg.seed)
    model = Lm(cfg.lm).to(device)
    opt = make_optimizer(model, tc, device)
    state = state if state is not None else store.load_train_state(lm_dir)
    step, history, metrics = 0, [], {}
    if state is not None:
        step, history = _restore(model, opt, state, cfg, lm_dir)
        metrics = dict(history[-1]) if history else {}
    ddp = wrap(model) if wrap else model
    amp = autocast_dtype(tc.dtype, device)
    val_batches = val_rows(cfg.seed, len(val_tok), tc)
    base = (unigram_baselines(train_tok, val_targets(val_tok, val_batches), cfg.lm.vocab_size)
            if rank == 0 else {})
    if rank == 0:
        logger.info("LM %.2f M params (non-embedding count, nanoGPT); val unigram entropy "
                    "%.4f nats, train-unigram cross-entropy %.4f; %s from step %d",
                    model.num_params() / 1e6, base["unigram_entropy"], base["unigram_xent"],
                    amp or torch.float32, step)
    on_log = on_log or _log_progress
    tokens_per_step = tc.batch_size * tc.grad_accum * train_tok.shape[1] * world_size
    t0, last_t, last_step, loss_sum = time.perf_counter(), time.perf_counter(), step, 0.0
    start = step
    while step < tc.max_iters:
        lr = get_lr(step, tc)
        for group in opt.param_groups:
            group["lr"] = lr
        loss_sum += _step(ddp, model, opt, train_tok, batch_rows(cfg.seed, step, rank,
                                                                  len(train_tok), tc),
                          device, amp, tc)
        step += 1
        if rank == 0 and (step % tc.log_interval == 0 or step == tc.max_iters):
            now = time.perf_counter()
            on_log({"step": step, "max_iters": tc.max_iters,
                    "loss": loss_sum / (step - last_step), "lr": lr,
                    "tokens_per_s": tokens_per_step * (step - last_step) / (now - last_t),
                    "elapsed_s": now - t0})
            last_t, last_step, loss_sum = now, step, 0.0
        if step % tc.eval_interval == 0 or step == tc.max_iters:
            t_eval = time.perf_counter()
            val_loss = evaluate(model, val_tok, val_batches, device, amp)
            metrics = {"step": step, "val_loss": val_loss, "lr": lr,
                       "tokens": step * tokens_per_step, "elapsed_s": t_eval - t0}
            history.append(metrics)
            _checkpoint(cfg, model, opt, step, history, base, rank, on_eval)
            last_t += time.perf_counter() - t_eval  # tokens/s counts training time only
    if start >= tc.max_iters and history:  # a finished run, restored: rewrite <out>/lm from it
        _checkpoint(cfg, model, opt, step, history, base, rank, None)
    return _summary(cfg, history, base) if rank == 0 else metrics


def _step(ddp: nn.Module, model: Lm, opt, rows: np.ndarray, idx: np.ndarray,
          device: torch.device, amp: torch.dtype | None, tc: TrainLmConfig) -> float:
    """One optimizer step over grad_accum micro-batches; returns the mean train loss."""
    total = torch.zeros((), device=device)
    for micro, batch in enumerate(idx):
        x, y = windows(rows, batch, device)
        last = micro == len(idx) - 1
        # DDP all-reduces gradients on the last micro-batch only (nanoGPT: grad sync)
        sync = contextlib.nullcontext() if last or ddp is model else ddp.no_sync()
        with sync:
            with _autocast(device, amp):
                loss = ddp(x, y).loss / tc.grad_accum
            loss.backward()
        total += loss.detach()
    if tc.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(total)


def _check_shapes(cfg: Config, T: int) -> None:
    if T > cfg.lm.block_size:
        raise UserError(f"the token shards of {cfg.out} hold contexts of {T} tokens, longer "
                        f"than lm.block_size={cfg.lm.block_size}")


def _restore(model: Lm, opt, state: dict, cfg: Config, lm_dir: str) -> tuple[int, list]:
    store.check_lm_config(lm_dir, from_dict(LmConfig, state["lm"]), cfg.lm)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    logger.info("resuming LM training from step %d (%s)", state["step"], lm_dir)
    return int(state["step"]), list(state["history"])


def _checkpoint(cfg: Config, model: Lm, opt, step: int, history: list, base: dict,
                rank: int, on_eval: OnEval | None) -> None:
    """Rank 0 writes <out>/lm; then every rank calls on_eval (Ray: report + checkpoint)."""
    save = None
    if rank == 0:
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                 "torch_rng": torch.get_rng_state(), "history": history,
                 "lm": dataclasses.asdict(cfg.lm)}
        summary = _summary(cfg, history, base)

        def save(directory: str) -> None:
            store.save_lm(directory, model, cfg, state, summary)

        save(store.Layout(cfg.out).lm)
        logger.info("step %d: val loss %.4f (val unigram entropy %.4f) -> %s", step,
                    history[-1]["val_loss"], base["unigram_entropy"], store.Layout(cfg.out).lm)
    if on_eval is not None:
        on_eval(dict(history[-1]), save)


def _summary(cfg: Config, history: list, base: dict) -> dict:
    last = history[-1] if history else {}
    return {**base, "val_loss": last.get("val_loss"), "step": last.get("step", 0),
            "tokens": last.get("tokens", 0), "max_iters": cfg.train_lm.max_iters,
            "dtype": cfg.train_lm.dtype, "threads": torch.get_num_threads(),
            "dir": store.Layout(cfg.out).lm, "history": history}


def _log_progress(m: dict) -> None:
    logger.info("step %d/%d | loss %.4f | lr %.2e | %.0f tokens/s | %.0f s", m["step"],
                m["max_iters"], m["loss"], m["lr"], m["tokens_per_s"], m["elapsed_s"])


# --- Ray Train -------------------------------------------------------------------------


def _worker(config: dict) -> None:
    """One DDP rank under TorchTrainer: resume from Ray's checkpoint, train, report."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = Config.from_dict(config["cfg"])
    ctx = ray.train.get_context()
    # Not Ray's OMP_NUM_THREADS (from the rank's 1-CPU reservation): the node's cores split
    # between its ranks, or --train_lm.threads (mono/threads.py).
    threads.pin(cfg.train_lm.threads or max(1, threads.cores() // ctx.get_local_world_size()))
    state = None
    if (ckpt := ray.train.get_checkpoint()) is not None:
        with ckpt.as_directory() as d:
            state = store.load_train_state(d)

    def on_eval(metrics: dict, save: Callable[[str], None] | None) -> None:
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if save is not None:
                save(d)
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint,
                             checkpoint_dir_name=f"step_{metrics['step']:08d}")

    train(cfg, state=state, on_eval=on_eval, device=ray.train.torch.get_device(),
          rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
          wrap=ray.train.torch.prepare_model if ctx.get_world_size() > 1 else None)


def check_inputs(cfg: Config) -> dict:
    """Fail before launching Ray work: token shards present, contexts fit the LM, and an
    existing <out>/lm checkpoint was trained with the same LmConfig, and a GPU where
    num_workers 0 asks this process for one. Returns the manifest."""
    tc = cfg.train_lm
    if tc.use_gpu and tc.num_workers == 0 and not torch.cuda.is_available():
        # On a cluster the driver runs on a CPU worker: the GPU is a Ray Train worker's.
        raise UserError("--train_lm.use_gpu with --train_lm.num_workers 0 trains in this "
                        "process, which sees no CUDA device; pass --train_lm.num_workers 1 "
                        "to train in a Ray Train worker on a GPU node")
    manifest = store.tokens_manifest(cfg.out)
    _check_shapes(cfg, manifest["ctx_len"])
    for split in ("train", "val"):
        if not manifest["splits"][split]["rows"]:
            raise UserError(f"the {split} split of {cfg.out}/tokens has no context windows")
    lm_dir = store.Layout(cfg.out).lm
    if store.exists(store.join(lm_dir, store.LM_CFG)):
        store.check_lm_config(lm_dir, store.lm_config(lm_dir), cfg.lm)
    return manifest


def check(cfg: Config) -> None:
    """The job's input check before Ray starts (mono.cli): `check_inputs`."""
    check_inputs(cfg)


def run(cfg: Config) -> dict:
    """Train the LM with Ray Train (num_workers DDP ranks, a GPU each with use_gpu), or with
    num_workers = 0 in this process (`train`, the GPU with use_gpu).

    Rerunning with the same out resumes from the latest checkpoint. Returns metrics.json:
    val_loss, unigram_entropy, unigram_xent, step, tokens, history.
    """
    tc = cfg.train_lm
    if tc.use_gpu and tc.num_workers:  # Ray Train would wait forever for missing GPUs
        gpus = cluster.check_gpus("--train_lm.use_gpu")
        if tc.num_workers > gpus:
            raise UserError(f"--num_workers {tc.num_workers} with --use_gpu: this cluster can "
                            f"scale to {gpus} GPU(s); pass --num_workers {gpus} or fewer")
    check_inputs(cfg)
    if tc.num_workers == 0:
        with threads.pinned(tc.threads):   # every core, not the job supervisor's 1 CPU
            train(cfg, device=torch.device("cuda" if tc.use_gpu else "cpu"))
        return store.read_lm_metrics(cfg.out)
    trainer = ray.train.torch.TorchTrainer(
        _worker, train_loop_config={"cfg": cfg.to_dict()},
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu),
        run_config=RunConfig(name="train_lm", storage_path=store.lm_ray_storage(cfg.out),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=tc.max_failures)),
    )
    trainer.fit()
    return store.read_lm_metrics(cfg.out)
