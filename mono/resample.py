"""Stage 4: dead-feature resampling (Towards Monosemanticity, appendix "Neuron resampling").

Reads fresh activation rows from a `ResampleSource` (`sample(n) -> (n, H) array`): here
`ArraySource` over an in-memory array; the shard-backed source and the `ResamplePool` Ray
actor serve the same interface. Writes, in place, only the dead features' rows of the SAE
(W_enc columns, W_dec rows, b_enc entries) and of the trainer's optimizer state.

Shapes: N tokens, H input width (d_mlp), F features, K dead features.

The recipe (paper), for the features that did not fire during the dead window:
1. draw `n_inputs` fresh inputs (paper: 819,200) and score each by loss^2, the loss being the
   per-example *training* loss, mean_H (x_hat - x)^2 + l1_coeff * sum_F f (the seed scored
   the per-dimension SUM of squared errors plus the L1 term: another normalisation);
2. pick one input per dead feature with probability proportional to its score, without
   replacement (numpy's Generator.choice: torch.multinomial stops at 2^24 categories);
3. dictionary vector = unit(x), the raw input as in the paper and the seed (not x - b_dec);
   encoder vector = unit(x) * 0.2 * mean encoder-vector norm of the alive features;
   encoder bias = 0; b_dec untouched;
4. reset the optimizer state of those rows, step counters included (`FeatureAdam`), so their
   next update is a fresh Adam's first step (~lr per element), not the 3-6x lr the seed's
   moment-only reset gave (seed_spec §5).
Limits: the scoring pass holds the n_inputs scores plus one (batch_size, F) block on device.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import Tensor

from mono import store
from mono.reader import shard_list, to_float32
from mono.sae import Trainer

logger = logging.getLogger(__name__)

ENCODER_SCALE = 0.2
"""Resampled encoder vectors get 0.2 x the mean alive encoder norm (paper)."""


@runtime_checkable
class ResampleSource(Protocol):
    """Anything that serves fresh random activation rows."""

    def sample(self, n: int) -> np.ndarray:
        """n rows (n, H), any float dtype, drawn afresh at each call."""
        ...


class ArraySource:
    """A `ResampleSource` over an in-memory (M, H) array: each call draws n distinct rows."""

    def __init__(self, acts: np.ndarray, seed: int = 0):
        if acts.ndim != 2 or len(acts) == 0:
            raise ValueError(f"ArraySource needs a non-empty (M, H) array, got shape {acts.shape}")
        self.acts = acts
        self.rng = np.random.default_rng(seed)

    def sample(self, n: int) -> np.ndarray:
        if not 0 < n <= len(self.acts):
            raise ValueError(f"ArraySource holds {len(self.acts)} rows, asked for {n}")
        return self.acts[np.sort(self.rng.choice(len(self.acts), size=n, replace=False))]


class ResampleResult(NamedTuple):
    """What `resample` did."""

    n_resampled: int
    """K: dead features given new vectors."""
    features: Tensor
    """(K,) int64 indices of the resampled features (on the SAE's device)."""
    inputs: np.ndarray
    """(K,) rows of the drawn sample that became their dictionary vectors."""
    encoder_norm: float
    """Norm given to the new encoder vectors: 0.2 x mean alive encoder norm."""


@torch.no_grad()
def score_inputs(trainer: Trainer, x: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    """x (M, H) -> (M,) float64 loss^2 per input, in batches of `batch_size` on the SAE's device."""
    sae = trainer.sae
    scores = []
    for start in range(0, len(x), batch_size):
        chunk = torch.as_tensor(x[start:start + batch_size]).to(sae.W_enc.device)
        scores.append(sae.per_example_loss(chunk).square().double().cpu())
    return torch.cat(scores).numpy()


def choose_inputs(scores: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k indices into scores (M,), drawn with probability proportional to score, without
    replacement while there are k positive scores (with replacement, warned, otherwise)."""
    if not np.all(np.isfinite(scores)) or np.any(scores < 0):
        raise ValueError("resampling scores must be finite and >= 0 (NaN/Inf in SAE or inputs?)")
    total = scores.sum()
    if total == 0:
        logger.warning("every resampling input has zero loss; drawing uniformly")
        p = np.full(len(scores), 1.0 / len(scores))
    else:
        p = scores / total
    replace = np.count_nonzero(p) < k
    if replace:
        logger.warning("only %d inputs with positive loss for %d dead features: drawing "
                       "with replacement", np.count_nonzero(p), k)
    return rng.choice(len(scores), size=k, replace=replace, p=p)


@torch.no_grad()
def resample(trainer: Trainer, dead: Tensor, source: ResampleSource, n_inputs: int,
             rng: np.random.Generator, batch_size: int = 8192) -> ResampleResult:
    """Give every feature in the (F,) bool mask `dead` a new high-loss input direction.

    Changes only the dead features' W_enc columns, W_dec rows, b_enc entries and their
    optimizer state (moments and step counts); everything else stays bit-identical.
    """
    sae = trainer.sae
    if dead.shape != (sae.n_features,) or dead.dtype != torch.bool:
        raise ValueError(f"dead must be a ({sae.n_features},) bool mask, got "
                         f"{tuple(dead.shape)} {dead.dtype}")
    features = torch.nonzero(dead.to(sae.W_enc.device)).squeeze(1)        # (K,)
    k = len(features)
    if k == 0:
        return ResampleResult(0, features, np.zeros(0, dtype=np.int64), 0.0)
    x = source.sample(n_inputs)
    if x.ndim != 2 or x.shape != (n_inputs, sae.d_in):
        raise ValueError(f"resample source returned {x.shape}, expected ({n_inputs}, {sae.d_in})")
    picks = choose_inputs(score_inputs(trainer, x, batch_size), k, rng)   # (K,)
    chosen = torch.as_tensor(x[picks]).to(sae.W_enc)                       # (K, H)
    unit = chosen / torch.linalg.vector_norm(chosen, dim=1, keepdim=True).clamp_min(1e-12)

    enc_norms = torch.linalg.vector_norm(sae.W_enc, dim=0)                 # (F,)
    if k < sae.n_features:
        enc_norm = ENCODER_SCALE * enc_norms[~dead.to(enc_norms.device)].mean().item()
    else:   # the paper's rule needs alive features; every one is dead here
        enc_norm = ENCODER_SCALE * enc_norms.mean().item()
        logger.warning("all %d features dead: encoder norm from the mean over all", k)
    sae.W_dec[features] = unit
    sae.W_enc[:, features] = unit.T * enc_norm
    sae.b_enc[features] = 0
    trainer.opt.reset_features_(features)
    logger.info("resampled %d dead features (encoder norm %.4g)", k, enc_norm)
    return ResampleResult(k, features, picks, enc_norm)


# === ResamplePool: the sweep's shared source of resampling inputs (Ray actor) ===========
# Owned by the sweep (mono.sweep): one named actor per experiment, shared by every trial.
# Everything above is the resampling algorithm and needs no Ray; Ray is imported only where
# an actor is started or called, so this module imports without a cluster.
#
# Sampling: a uniform random sample of the activation rows, drawn from every shard. Reading
# n uniformly scattered rows touches ~min(n, row groups) row groups (the paper preset: all
# 97 k groups, ~400 GB, for 819,200 rows), so the pool draws a two-stage sample instead:
# each row group is read with probability pi and, when read, a fraction psi of its rows is
# kept, pi * psi = n / rows. Every row has the same chance n / rows to be drawn, and a draw
# reads ~n / pool_rows_per_group groups. Rows within a shard were shuffled at collection,
# so a row group spans most of its shard's contexts; the price is some correlation between
# rows of one group.
#
# Freshness: a row is served once. `sample(n)` takes n random fresh rows; a background
# thread replaces them with new draws (the paper: "a fresh random 819,200 inputs" for each
# resampling). A call waits while fewer than n rows are fresh; n > pool size is drawn from
# the shards directly. Draws are not repeatable: the generator is seeded afresh at each
# (re)start, and which trial gets which rows depends on timing (a sweep's training batches
# are seeded; its resampling inputs are a fresh uniform sample, not a fixed one).

POOL_NAMESPACE = "mono"
"""Ray namespace of the sweep's named actors (a job's default namespace is anonymous)."""
POOL_OVERSAMPLE = 1.1
"""A draw plans for 10% more rows than asked, then keeps a uniform subset of n."""


class RowGroups(NamedTuple):
    """Every Parquet row group of an activation dataset; G row groups over S shards."""

    files: list[str]
    """The S shard paths (local or URI)."""
    dtype: str
    """Stored activation dtype (float16, float32, or bfloat16 as uint16 bits)."""
    H: int
    """Activation width."""
    shard: np.ndarray
    """(G,) int32 index into files."""
    group: np.ndarray
    """(G,) int32 row-group index within its shard."""
    first: np.ndarray
    """(G,) int64 global id (over all shards, in file order) of the group's first row."""
    size: np.ndarray
    """(G,) int64 rows in the group."""


def row_groups(source, threads: int = 16) -> RowGroups:
    """The row groups of `source` (a run dir, an acts dir or a list of shards; see
    `mono.reader.shard_list`), from the shard footers read in parallel."""
    shards = shard_list(source)
    files = shards["files"]
    with ThreadPoolExecutor(threads) as pool:
        sizes = [info["row_groups"] for info in pool.map(store.acts_shard_info, files)]
    shard = np.concatenate([np.full(len(s), i, np.int32) for i, s in enumerate(sizes)])
    group = np.concatenate([np.arange(len(s), dtype=np.int32) for s in sizes])
    size = np.concatenate([np.asarray(s, np.int64) for s in sizes])
    first = np.concatenate([[0], np.cumsum(size)[:-1]]).astype(np.int64)
    return RowGroups(files, shards["dtype"], shards["H"], shard, group, first, size)


def plan_draw(size: np.ndarray, n: int, rows_per_group: int,
              rng: np.random.Generator) -> np.ndarray:
    """(G,) rows to take from each row group, for ~n rows with equal inclusion chances.

    Each group is read with probability pi and keeps a fraction psi of its rows (rounded
    stochastically), with pi * psi = n / total and psi ~ rows_per_group / mean group size.
    """
    total = int(size.sum())
    phi = min(1.0, n / total)
    psi = min(1.0, max(phi, rows_per_group / float(size.mean())))
    read = rng.random(len(size)) < phi / psi                                    # (G,)
    want = size * psi                                                           # (G,)
    counts = np.floor(want) + (rng.random(len(size)) < want - np.floor(want))   # (G,)
    return np.where(read, np.minimum(counts, size), 0).astype(np.int64)


def draw_rows(groups: RowGroups, n: int, rng: np.random.Generator, rows_per_group: int = 512,
              threads: int = 8) -> dict[str, np.ndarray]:
    """n distinct rows, each row of the dataset equally likely, in random order:
    {"acts": (n, H) in the stored dtype, "shard": (n,) int32, "row": (n,) int64 global id}.
    Reads only the row groups `plan_draw` picks (in parallel)."""
    total = int(groups.size.sum())
    if not 0 < n <= total:
        raise ValueError(f"can draw 1..{total} rows from {len(groups.files)} shards, asked {n}")
    parts: list[dict[str, np.ndarray]] = []
    have = np.zeros(0, np.int64)
    while len(have) < n:
        need = n - len(have)
        counts = plan_draw(groups.size, min(total, int(need * POOL_OVERSAMPLE) + 16),
                           rows_per_group, rng)
        jobs = []  # (group, sorted rows in it), chosen here so the threads only read
        for g in np.flatnonzero(counts):
            picks = rng.choice(int(groups.size[g]), int(counts[g]), replace=False)
            jobs.append((int(g), np.sort(picks)))
        with ThreadPoolExecutor(threads) as pool:
            got = list(pool.map(lambda job: _read_rows(groups, *job), jobs))
        if not got:
            continue
        part = {k: np.concatenate([p[k] for p in got]) for k in got[0]}
        fresh = ~np.isin(part["row"], have)       # a later round may repeat earlier rows
        part = {k: v[fresh] for k, v in part.items()}
        parts.append(part)
        have = np.concatenate([have, part["row"]])
    rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    keep = rng.choice(len(rows["row"]), size=n, replace=False)  # a uniform subset, shuffled
    return {k: v[keep] for k, v in rows.items()}


def _read_rows(groups: RowGroups, g: int, rows: np.ndarray) -> dict[str, np.ndarray]:
    fs, path = store.resolve(groups.files[groups.shard[g]])
    with fs.open_input_file(path) as fh:
        table = pq.ParquetFile(fh).read_row_group(int(groups.group[g]), columns=["acts"])
    acts = store.acts_array(table.column("acts"))                               # (size, H)
    return {"acts": acts[rows], "shard": np.full(len(rows), groups.shard[g], np.int32),
            "row": groups.first[g] + rows}


class ResamplePool:
    """A pool of `pool_rows` uniformly drawn activation rows that serves `sample(n)`.

    Run as a Ray actor by `start_pool` (threaded: `max_concurrency` calls at once, state
    behind one condition variable); usable as a plain object too (tests). The first fill
    and every refill run in a background thread, so construction returns at once.
    """

    def __init__(self, source, pool_rows: int, seed: int = 0, rows_per_group: int = 512):
        self.source = str(source)
        self.groups = row_groups(source)
        total = int(self.groups.size.sum())
        self.capacity = min(pool_rows, total)
        if self.capacity < pool_rows:
            logger.info("ResamplePool: the dataset holds %d rows, fewer than pool_rows=%d",
                        total, pool_rows)
        self.rows_per_group = rows_per_group
        # Seeded afresh at each (re)start: rows served before a crash are not served again.
        seq = np.random.SeedSequence([seed, time.time_ns()])
        self._fill_rng, self._serve_rng = (np.random.default_rng(s) for s in seq.spawn(2))
        dtype = np.dtype(store.ACTS_STORAGE[self.groups.dtype])
        self.acts = np.zeros((self.capacity, self.groups.H), dtype)              # (P, H)
        self.shard = np.full(self.capacity, -1, np.int32)                        # (P,)
        self.row = np.full(self.capacity, -1, np.int64)                          # (P,)
        self.fresh = np.zeros(self.capacity, bool)                               # (P,)
        self.counts = {"served": 0, "drawn": 0, "direct": 0, "calls": 0}
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        threading.Thread(target=self._refill_forever, name="pool-refill", daemon=True).start()

    def sample(self, n: int) -> np.ndarray:
        """n fresh rows (n, H): float16 when stored so (half the object-store bytes),
        float32 otherwise. `PoolClient` converts to float32."""
        x = self.draw(n)["acts"]                                                 # (n, H)
        if self.groups.dtype == "bfloat16":  # stored as uint16 bits: decode here
            return to_float32(x, "bfloat16").numpy()
        return x

    def draw(self, n: int) -> dict[str, np.ndarray]:
        """n fresh rows with their origin: {"acts" (n, H) stored dtype, "shard" (n,),
        "row" (n,) global row id}. Waits while fewer than n pool rows are fresh."""
        if not isinstance(n, (int, np.integer)) or n <= 0:
            raise ValueError(f"ResamplePool.sample needs a positive row count, got {n!r}")
        if n > self.capacity:
            with self._cond:
                rng = self._serve_rng.spawn(1)[0]
                self.counts["calls"] += 1
                self.counts["direct"] += n
            logger.warning("ResamplePool: %d rows asked, the pool holds %d: drawing them from "
                           "the shards directly (raise sweep.pool_rows)", n, self.capacity)
            return draw_rows(self.groups, n, rng, self.rows_per_group)
        with self._cond:
            self._cond.wait_for(lambda: self.error is not None or self.fresh.sum() >= n)
            if self.error is not None:
                raise RuntimeError(f"ResamplePool over {self.source} cannot refill: "
                                   f"{self.error!r}") from self.error
            idx = self._serve_rng.choice(np.flatnonzero(self.fresh), size=n, replace=False)
            out = {"acts": self.acts[idx], "shard": self.shard[idx], "row": self.row[idx]}
            self.fresh[idx] = False
            self.counts["served"] += n
            self.counts["calls"] += 1
            self._cond.notify_all()
        return out

    def stats(self) -> dict:
        """Pool state: source, capacity, fresh rows, served / drawn / direct row counts,
        calls, the actor's pid (a restart changes it) and any refill error."""
        with self._cond:
            return {"source": self.source, "capacity": self.capacity,
                    "fresh": int(self.fresh.sum()), **self.counts, "pid": os.getpid(),
                    "error": repr(self.error) if self.error else None}

    def ready(self) -> dict:
        """Wait until the pool is full (the first fill); returns `stats()`."""
        with self._cond:
            self._cond.wait_for(lambda: self.error is not None or self.fresh.all())
        return self.stats()

    def _refill_forever(self) -> None:
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: not self.fresh.all())
                    slots = np.flatnonzero(~self.fresh)                           # (k,)
                rows = draw_rows(self.groups, len(slots), self._fill_rng, self.rows_per_group)
                with self._cond:
                    self.acts[slots] = rows["acts"]
                    self.shard[slots], self.row[slots] = rows["shard"], rows["row"]
                    self.fresh[slots] = True
                    self.counts["drawn"] += len(slots)
                    self._cond.notify_all()
        except BaseException as err:  # surfaced to every waiting and later sample() call
            logger.exception("ResamplePool refill failed")
            with self._cond:
                self.error = err
                self._cond.notify_all()


def pool_name(experiment_dir: str) -> str:
    """The actor name of an experiment's pool: its base name + a hash of its full path, so
    two sweeps named alike (other run dirs, other users) never share a pool."""
    digest = hashlib.sha1(str(experiment_dir).encode()).hexdigest()[:8]
    return f"resample-pool-{str(experiment_dir).rstrip('/').rsplit('/', 1)[-1]}-{digest}"


def start_pool(source, name: str, pool_rows: int, seed: int = 0, rows_per_group: int = 512):
    """The named ResamplePool actor (`name` in POOL_NAMESPACE), created or, if it runs
    already, reused. Owned by the calling driver (not detached): it dies with the driver.
    Ray restarts it if it dies (`max_restarts=-1`: a restart refills it) and retries the
    calls in flight (`max_task_retries=-1`). num_cpus=0: it idles between resamplings and
    must not take a CPU slot from the trials."""
    import ray

    actor = ray.remote(ResamplePool).options(
        name=name, namespace=POOL_NAMESPACE, get_if_exists=True, num_cpus=0,
        max_restarts=-1, max_task_retries=-1, max_concurrency=8)
    handle = actor.remote(source, pool_rows, seed, rows_per_group)
    found = ray.get(handle.stats.remote())["source"]
    if found != str(source):
        raise ValueError(f"a ResamplePool named {name!r} already serves {found!r}, "
                         f"not {str(source)!r}")
    return handle


class PoolClient:
    """A `ResampleSource` over the pool actor: what the sweep hands train_sae. Picklable
    (an actor handle), so Tune ships it to every trial."""

    def __init__(self, handle):
        self.handle = handle

    def sample(self, n: int) -> np.ndarray:
        """n fresh rows (n, H) float32 (a writable copy; Ray's arrays are read-only views)."""
        import ray

        return np.array(ray.get(self.handle.sample.remote(n)), dtype=np.float32)
