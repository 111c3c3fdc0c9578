"""Stage 4: dead-feature resampling (Towards Monosemanticity, appendix "Neuron resampling").

Reads fresh activation rows from a `ResampleSource` (`sample(n) -> (n, H) array`): here
`ArraySource` over an in-memory array; the shard-backed source and the `ResampleService`
Ray actor (through `SharedDraw`) serve the same interface. Writes, in place, only the dead
features' rows of the SAE (W_enc columns, W_dec rows, b_enc entries) and of the trainer's
optimizer state.

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
from concurrent.futures import Future, ThreadPoolExecutor
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
    """x (M, H) -> (M,) float64 loss^2 per input, in batches of `batch_size` on the SAE's device.

    x may be float16 and read-only (the sweep's shared draw): only one batch at a time is
    copied and converted, never the whole draw."""
    sae = trainer.sae
    scores = []
    for start in range(0, len(x), batch_size):
        chunk = torch.from_numpy(np.array(x[start:start + batch_size])).to(sae.W_enc.device)
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


# === ResampleService: one shared, deterministic draw per resample step (Ray actor) =======
# Owned by the sweep (mono.sweep): one named actor per experiment, shared by every trial.
# Everything above is the resampling algorithm and needs no Ray; Ray is imported only where
# an actor is started or called, so this module imports without a cluster.
#
# Sampling: a uniform random sample of the activation rows, drawn from every shard. Reading
# n uniformly scattered rows touches ~min(n, row groups) row groups (the paper preset: all
# of its ~250 k groups for 819,200 rows), so a draw is two-stage instead: each row group is
# read with probability pi and, when read, a fraction psi of its rows is kept,
# pi * psi = n / rows. Every row has the same chance n / rows to be drawn, and a draw reads
# ~n / rows_per_group groups. Rows within a shard were shuffled at collection, so a row
# group spans most of its shard's contexts; the price is some correlation between rows of
# one group.
#
# Sharing: the draw of resample step s is seeded by (seed, s) alone, computed once, put
# once into the object store and handed to every trial as a reference, so every grid point
# resamples from the same inputs, a retried trial (or a restarted service) gets the same
# rows, and a node fetches the object once for all its trials (they read it zero-copy).
# The paper's "fresh random 819,200 inputs" per resampling: each step's draw is a new one.

NAMESPACE = "mono"
"""Ray namespace of the sweep's named actors (a job's default namespace is anonymous)."""
_DRAW = 13
"""Domain tag of a draw's generator, default_rng([seed, 13, step]) (train_sae uses 11, 12)."""
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


class ResampleService:
    """The experiment's resampling draws: `draw(step, n)` -> [ObjectRef of (n, H) rows].

    The draw for (step, n) is `draw_rows` with a generator seeded by (seed, step): computed
    once (the first request, or ahead of time: at start the first step of `steps`, after
    serving step s the next one), put once into the object store, and kept for the last
    `keep` steps (an older one asked again, by a retried trial, is recomputed: the same
    rows). Rows come back float16 when stored so (half the bytes; `score_inputs` converts
    batch by batch), float32 otherwise (bfloat16 decoded here). Run as a Ray actor by
    `start_service`; usable as a plain object too (tests), then `draw` returns the arrays.
    """

    def __init__(self, source, seed: int, steps=(), n: int = 0, rows_per_group: int = 512,
                 keep: int = 2, put=None):
        self.source, self.seed = str(source), seed
        self.groups = row_groups(source)
        self.total = int(self.groups.size.sum())
        self.steps, self.rows_per_group, self.keep = sorted(steps), rows_per_group, keep
        self._put = put if put is not None else (lambda x: x)
        self._lock = threading.Lock()
        self._draws: dict[tuple[int, int], Future] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="draw")  # one draw at a time
        self.counts = {"computed": 0, "served": 0, "max_wait_s": 0.0}
        self.served: dict[int, int] = {}
        """step -> requests served (how many trials resampled at it)."""
        if self.steps and n:
            self._future(self.steps[0], n)

    def _future(self, step: int, n: int) -> Future:
        with self._lock:
            key = (int(step), int(n))
            fut = self._draws.get(key)
            if fut is None:
                fut = self._draws[key] = self._pool.submit(self._compute, *key)
            # hold the last `keep` draws; the store frees a dropped one once no trial holds it
            old = [k for k in sorted(self._draws) if k != key and self._draws[k].done()]
            for k in old[:max(0, len(self._draws) - self.keep)]:
                del self._draws[k]
            return fut

    def _compute(self, step: int, n: int):
        if not 0 < n <= self.total:
            raise ValueError(f"resampling draw of {n} rows from {self.total} rows of "
                             f"{self.source}")
        rng = np.random.default_rng([self.seed, _DRAW, step])
        x = draw_rows(self.groups, n, rng, self.rows_per_group)["acts"]            # (n, H)
        if self.groups.dtype == "bfloat16":  # stored as uint16 bits: decode here
            x = to_float32(x, "bfloat16").numpy()
        with self._lock:
            self.counts["computed"] += 1
        logger.info("ResampleService: drew %d rows for step %d (%.0f MB)", n, step,
                    x.nbytes / 1e6)
        return self._put(x)

    def draw(self, step: int, n: int) -> list:
        """[the (n, H) draw of `step`] (an ObjectRef in the actor: the list keeps Ray from
        inlining the array into the reply, so every trial shares the one stored copy)."""
        if not isinstance(n, (int, np.integer)) or n <= 0:
            raise ValueError(f"ResampleService.draw needs a positive row count, got {n!r}")
        t0 = time.perf_counter()
        fut = self._future(step, n)
        try:
            out = fut.result()
        except BaseException:
            with self._lock:  # not cached: the next request (a retry) computes it again
                if self._draws.get((int(step), int(n))) is fut:
                    del self._draws[(int(step), int(n))]
            raise
        wait = time.perf_counter() - t0
        with self._lock:
            self.counts["served"] += 1
            self.counts["max_wait_s"] = max(self.counts["max_wait_s"], wait)
            self.served[int(step)] = self.served.get(int(step), 0) + 1
        later = [s for s in self.steps if s > step]
        if later:  # the next step's draw, ahead of the trials that will ask for it
            self._future(later[0], n)
        return [out]

    def stats(self) -> dict:
        """source, rows, draws computed, requests served (total and per step), the longest
        wait of a request, the draws held, and the actor's pid (a restart changes it)."""
        with self._lock:
            return {"source": self.source, "rows": self.total, **self.counts,
                    "served_per_step": dict(self.served), "held": sorted(self._draws),
                    "pid": os.getpid()}


def service_name(experiment_dir: str) -> str:
    """The actor name of an experiment's service: its base name + a hash of its full path,
    so two sweeps named alike (other run dirs, other users) never share one."""
    digest = hashlib.sha1(str(experiment_dir).encode()).hexdigest()[:8]
    return f"resample-{str(experiment_dir).rstrip('/').rsplit('/', 1)[-1]}-{digest}"


def start_service(source, name: str, seed: int, steps, n: int, H: int,
                  rows_per_group: int = 512, keep: int = 2):
    """The named ResampleService actor (`name` in NAMESPACE), created or, if it runs
    already, reused.

    Lives deliberately: owned by the calling driver (not detached: it dies with the sweep),
    placed on the driver's node (soft affinity: the head under `ray job submit`, which the
    autoscaler never removes, unlike an idle worker node), restarted by Ray if it dies
    (`max_restarts=-1`; the draws are recomputed, the same rows) with the calls in flight
    retried. It reserves the heap a draw takes to build (~3 x n x H x 4 bytes: the row
    groups read, their rows, the subset); the `keep` draws it holds (n x H x 2 bytes each in
    float16) sit in the object store. num_cpus=0: it idles between resamplings and must not
    take a CPU slot from the trials."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    actor = ray.remote(_RayService).options(
        name=name, namespace=NAMESPACE, get_if_exists=True, num_cpus=0,
        memory=max(1, 3 * n * H * 4), max_restarts=-1, max_task_retries=-1,
        max_concurrency=16,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=True))
    handle = actor.remote(source, seed, tuple(steps), n, rows_per_group, keep)
    found = ray.get(handle.stats.remote())["source"]
    if found != str(source):
        raise ValueError(f"a ResampleService named {name!r} already serves {found!r}, "
                         f"not {str(source)!r}")
    return handle


class _RayService(ResampleService):
    """ResampleService as an actor: draws go into the object store (`ray.put`) once."""

    def __init__(self, *args):
        import ray

        super().__init__(*args, put=ray.put)


class SharedDraw:
    """The `ResampleSource` the sweep hands train_sae: `at_step(step).sample(n)` fetches
    the service's draw of that step (by reference: one fetch per node, read-only, float16
    when stored so). Picklable (an actor handle), so Tune ships it to every trial."""

    def __init__(self, handle):
        self.handle = handle

    def at_step(self, step: int) -> _StepDraw:
        return _StepDraw(self.handle, step)

    def sample(self, n: int) -> np.ndarray:
        raise TypeError("SharedDraw serves one draw per resample step: call at_step(step)")


class _StepDraw:
    def __init__(self, handle, step: int):
        self.handle, self.step = handle, step

    def sample(self, n: int) -> np.ndarray:
        import ray

        (ref,) = ray.get(self.handle.draw.remote(self.step, n))
        return ray.get(ref)


def source_at(source: ResampleSource, step: int) -> ResampleSource:
    """The source to resample from at `step`: `source.at_step(step)` for sources whose
    draws are seeded by the step (the sweep's SharedDraw, train_sae's default), else the
    source itself."""
    at_step = getattr(source, "at_step", None)
    return at_step(step) if at_step is not None else source
