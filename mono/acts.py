"""Stage 3: token shards + the LM -> Parquet activation shards (Ray Data actor pool).
`mono.reader` streams them back (SAE training, resampling draws, Ray Data).

Reads <out>/tokens/train (the first `n_contexts` contexts, 0 = all; token manifest for the
ctx ranges) and <out>/lm/ (store.load_lm). Writes <out>/acts/part-{first ctx:09d}.parquet,
one shard per fixed range of `shard_contexts` contexts (schema in `store`), then
<out>/acts/manifest.json, last and atomically.

Shapes: n contexts of a shard, b of an LM batch, T context, P positions per context
(tokens_per_context), H d_mlp, N rows (n * P).

Sampling: per context, P positions drawn without replacement from a generator seeded by
(seed, ctx) (the seed's HEAD prepare.py; its earlier versions drew with replacement), so
the rows do not depend on how many actors ran or how work was cut. Only the sampled rows
are computed (`Lm.mlp_acts(idx, positions)`), in float32, then stored as `dtype`. Rows are
shuffled within a shard by a generator seeded by (seed, first ctx); `reader.ActsReader`
mixes shards.

Ray: `ray.data.from_items` holds one item per unfinished shard; `map_batches(Collector)`
runs an actor pool (`ActorPoolStrategy(min_size=1, max_size=N)`, one GPU each on GPU nodes)
that loads the LM once per actor, reads its token windows, computes, shuffles and writes its
shard atomically (temporary name + rename) itself, returning one summary row. On CPU the
pool leaves one CPU free (two 1-CPU actors on a 2-CPU box deadlock, RAY_NOTES §1.2). Each
actor runs `cpus_per_actor + 1` calls at once with the LM behind a lock, so writing one
shard overlaps computing the next: Parquet's fp16 encoding costs ~10 ns per value on one
core (~5 us per row at H=512), which on a GPU node is the bottleneck, not the LM.

Failure: bad input (missing token shards, an LM whose config differs from cfg.lm, e.g. its
d_mlp, tokens_per_context > T, an output dir holding another LM's or setting's shards)
raises before anything is written. A UDF exception is retried in place (`max_map_retries`);
a dead actor is restarted by Ray and its shard redone. A rerun skips every shard whose
footer matches (rows + metadata) and redoes the rest, so the result is exact: contexts x P
rows, no (ctx, pos) twice. Test hook: MONO_TEST_FAIL_ONCE=<dir> makes the first shard call
in any process fail once (a marker file in <dir> makes it exactly once), after leaving a
half-written temporary file; MONO_TEST_FAIL_MODE=exit kills the actor process instead, and
=hang leaves it writing forever (the marker says its node id, shard and pid), for a test
to kill its node.

Limits: the token split is always train; a rerun with another `shard_contexts` or seed into
the same dir is refused (acts.overwrite replaces); reader.ActsReader's mixing is bounded by
its window (see there). Paper preset: 2 M contexts x 200 = 400 M rows, 1954 shards, ~350 GB.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import asdict

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import torch
from ray.data import ActorPoolStrategy, DataContext
from tqdm import tqdm

from mono import cluster, store, threads
from mono.config import Config
from mono.errors import BadOutput, MissingInput, UserError
from mono.lm import Lm

logger = logging.getLogger(__name__)

FAIL_ONCE_ENV = "MONO_TEST_FAIL_ONCE"
FAIL_MODE_ENV = "MONO_TEST_FAIL_MODE"
# Domain tags for np.random.default_rng([seed, tag, id]): positions and shard shuffles draw
# from unrelated streams even where a ctx id equals a shard's first ctx.
_POSITIONS, _SHUFFLE = 1, 2  # (3: the reading order, mono.reader)
# Shard-metadata keys that must match for a shard to count as this run's.
IDENTITY_KEYS = ("lm_sha256", "tokens_sha256", "seed", "split", "tokens_per_context",
                 "ctx_len", "shard_contexts", "dtype", "d_mlp")
MAP_RETRIES = 3  # in-place retries of a failed shard call (UDF exceptions; RAY_NOTES §1.5)


# --- sampling and compute (plain functions, no Ray) ------------------------------------


def sample_positions(seed: int, ctx: np.ndarray, ctx_len: int, k: int) -> np.ndarray:
    """(B,) context ids -> (B, k) int64 sorted positions, k of ctx_len without replacement,
    each row from its own generator seeded by (seed, ctx)."""
    if not 0 < k <= ctx_len:
        raise ValueError(f"tokens_per_context must be in [1, {ctx_len}], got {k}")
    out = np.empty((len(ctx), k), dtype=np.int64)
    for i, c in enumerate(ctx):
        rng = np.random.default_rng([seed, _POSITIONS, int(c)])
        out[i] = np.sort(rng.choice(ctx_len, size=k, replace=False))
    return out


def to_storage(acts: torch.Tensor, dtype: str) -> np.ndarray:
    """float activations (..., H) -> numpy in the shard's storage dtype (bf16 as uint16)."""
    match dtype:
        case "float16":
            return acts.to(torch.float16).cpu().numpy()
        case "float32":
            return acts.to(torch.float32).cpu().numpy()
        case "bfloat16":
            return acts.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
        case other:
            raise ValueError(f"unknown activation dtype {other!r}")


def chunk_acts(lm: Lm, tokens: np.ndarray, positions: np.ndarray, batch_contexts: int,
               dtype: str, device: str = "cpu") -> np.ndarray:
    """tokens (n, T), positions (n, P) -> (n, P, H) activations in the storage dtype,
    computed batch_contexts contexts at a time."""
    n, p = positions.shape
    out = np.empty((n, p, lm.cfg.d_mlp), dtype=store.ACTS_STORAGE[dtype])
    for s in range(0, n, batch_contexts):
        idx = torch.from_numpy(tokens[s:s + batch_contexts].astype(np.int64)).to(device)
        pos = torch.from_numpy(positions[s:s + batch_contexts]).to(device)
        out[s:s + batch_contexts] = to_storage(lm.mlp_acts(idx, pos), dtype)  # (b, P, H)
    return out


def shard_table(tokens: np.ndarray, ctx: np.ndarray, positions: np.ndarray,
                acts: np.ndarray, dtype: str, meta: dict, seed: int):
    """One shard's rows, shuffled by a generator seeded by (seed, first ctx).

    tokens (n, T), ctx (n,), positions (n, P), acts (n, P, H) -> pa.Table of n*P rows.
    """
    n, p = positions.shape
    order = np.random.default_rng([seed, _SHUFFLE, int(ctx[0])]).permutation(n * p)  # (N,)
    ctx_col = np.repeat(ctx, p)                                                    # (N,)
    tok_col = np.take_along_axis(tokens, positions, axis=1).reshape(-1)            # (N,)
    return store.acts_table(ctx_col[order], positions.reshape(-1)[order], tok_col[order],
                            acts.reshape(n * p, -1)[order], dtype, meta)


# --- checkpoints and inputs ------------------------------------------------------------


def lm_checksum(out: str) -> str:
    """sha256 of <out>/lm/model.safetensors: which weights a shard came from."""
    path = store.join(store.Layout(out).lm, store.LM_WEIGHTS)
    if not store.exists(path):
        raise MissingInput(f"no LM weights {path}: run `python -m ray_jobs.train_lm "
                           f"--out {out}` first")
    return hashlib.sha256(store.read_bytes(path)).hexdigest()


def tokens_identity(tokens_manifest: dict) -> str:
    """sha256 of the token manifest (less its location): which contexts ctx ids name."""
    body = {k: v for k, v in tokens_manifest.items() if k != "dir"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class TokenWindows:
    """Reads token windows [first, first + n) of a split from its shards, caching the last
    file (consecutive shards of one actor usually share a token file)."""

    def __init__(self, out: str, split: str = "train"):
        self.dir = store.Layout(out).tokens(split)
        self.files = store.tokens_manifest(out)["splits"][split]["files"]
        self.firsts = np.array([f["first"] for f in self.files], dtype=np.int64)
        self._cached: tuple[str, np.ndarray] | None = None

    def read(self, first: int, n: int) -> np.ndarray:
        """-> (n, T) token ids (uint16 as stored)."""
        parts = []
        k = int(np.searchsorted(self.firsts, first, side="right")) - 1
        while n > 0:
            meta = self.files[k]
            tokens = self._file(meta["name"])
            lo = first - meta["first"]
            take = tokens[lo:lo + n]
            parts.append(take)
            first, n, k = first + len(take), n - len(take), k + 1
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _file(self, name: str) -> np.ndarray:
        if self._cached is None or self._cached[0] != name:
            col = store.read_table(store.join(self.dir, name), ["tokens"]).column("tokens")
            col = col.combine_chunks()
            t = col.type.list_size
            self._cached = name, col.flatten().to_numpy().reshape(-1, t)  # (rows, T)
        return self._cached[1]


# --- the actor -------------------------------------------------------------------------


class Collector:
    """Ray Data UDF: one item {first, n} -> one activation shard written, one summary row.

    Loads the LM once per actor (Ray re-runs __init__ on restart). Constructor arguments are
    paths and small settings only, never weights (RAY_NOTES §1.5).
    """

    def __init__(self, out: str, settings: dict, device: str = "cpu", n_threads: int = 0,
                 fail_once: str = "", fail_mode: str = "raise"):
        self.n_threads = threads.pin(n_threads)  # 0: its cpus_per_actor (mono/threads.py)
        device = cluster.torch_device(device)
        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
        self.out, self.s, self.device = out, settings, device
        self.fail_once, self.fail_mode = fail_once, fail_mode
        self.lm = store.load_lm(out, device=device)
        sha = lm_checksum(out)
        if sha != settings["lm_sha256"]:
            raise RuntimeError(f"{store.Layout(out).lm} changed during collection "
                               f"(sha256 {sha[:12]} != {settings['lm_sha256'][:12]})")
        self.tokens = TokenWindows(out, settings["split"])
        self._lm_lock = threading.Lock()  # one forward at a time; writes overlap it
        self._io_lock = threading.Lock()  # TokenWindows' cache is not thread-safe

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [self.collect(int(f), int(n)) for f, n in zip(batch["first"], batch["n"])]
        return {k: np.array([r[k] for r in rows]) for k in rows[0]}

    def collect(self, first: int, n: int) -> dict:
        """Compute and write the shard of contexts [first, first + n)."""
        s, t0 = self.s, time.perf_counter()
        path = store.join(store.Layout(self.out).acts, store.acts_shard_name(first))
        with self._io_lock:
            tokens = self.tokens.read(first, n)                                  # (n, T)
        ctx = np.arange(first, first + n, dtype=np.int64)                        # (n,)
        positions = sample_positions(s["seed"], ctx, s["ctx_len"], s["tokens_per_context"])
        with self._lm_lock:
            acts = chunk_acts(self.lm, tokens, positions, s["batch_contexts"], s["dtype"],
                              self.device)                                       # (n, P, H)
        self._maybe_fail(path)
        meta = {k: s[k] for k in IDENTITY_KEYS} | {"first_ctx": first, "n_contexts": n}
        table = shard_table(tokens, ctx, positions, acts, s["dtype"], meta, s["seed"])
        size = store.write_acts_shard(path, table, s["compression"], s["row_group_rows"])
        return {"first": first, "rows": table.num_rows, "bytes": size,
                "seconds": time.perf_counter() - t0, "node": self.node,
                "threads": self.n_threads}

    def _maybe_fail(self, path: str) -> None:
        """The test fault switch: fail once across all processes, mid-write."""
        if not self.fail_once:
            return
        try:
            fd = os.open(os.path.join(self.fail_once, "failed"),
                         os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        store.write_bytes_atomic(f"{path}.tmp-crashed", b"half a shard")
        os.write(fd, f"{self.node} {os.path.basename(path)} {os.getpid()}".encode())
        os.close(fd)
        if self.fail_mode == "exit":
            os._exit(1)
        while self.fail_mode == "hang":  # mid-write until the test terminates this node
            time.sleep(1)
        raise RuntimeError(f"injected failure ({FAIL_ONCE_ENV}) while writing {path}")


# --- the driver ------------------------------------------------------------------------


def plan(n_contexts: int, shard_contexts: int) -> list[tuple[int, int]]:
    """[(first ctx, n contexts)] of every shard: fixed ranges, so names are stable."""
    return [(f, min(shard_contexts, n_contexts - f)) for f in range(0, n_contexts, shard_contexts)]


def _settings(cfg: Config, tokens_manifest: dict, lm_sha: str) -> dict:
    a = cfg.acts
    return {"lm_sha256": lm_sha, "tokens_sha256": tokens_identity(tokens_manifest),
            "seed": cfg.seed, "split": "train", "tokens_per_context": a.tokens_per_context,
            "ctx_len": tokens_manifest["ctx_len"], "shard_contexts": a.shard_contexts,
            "dtype": a.dtype, "d_mlp": cfg.lm.d_mlp, "batch_contexts": a.batch_contexts,
            "compression": a.compression, "row_group_rows": a.row_group_rows}


def check_inputs(cfg: Config) -> tuple[dict, dict, int]:
    """Validate tokens, LM and sizes before any work: (tokens manifest, settings, n ctx)."""
    a, out = cfg.acts, cfg.out
    tm = store.tokens_manifest(out)
    T = tm["ctx_len"]
    if a.tokens_per_context > T:
        raise UserError(f"acts.tokens_per_context ({a.tokens_per_context}) > the token "
                        f"shards' ctx_len ({T}) in {store.Layout(out).tokens_manifest}")
    if T > 32768:
        raise UserError(f"ctx_len {T} does not fit the shards' int16 pos column")
    available = tm["splits"]["train"]["rows"]
    if available == 0:
        raise UserError(f"no train contexts in {store.Layout(out).tokens('train')}")
    n = a.n_contexts or available
    if n > available:
        raise UserError(f"acts.n_contexts ({a.n_contexts}) > the {available} train contexts "
                        f"in {store.Layout(out).tokens('train')}")
    tdir = store.Layout(out).tokens("train")
    for f in (f for f in tm["splits"]["train"]["files"] if f["first"] < n):
        _check_token_shard(store.join(tdir, f["name"]), f["rows"])
    sha = lm_checksum(out)
    lm = store.load_lm(out, expect=cfg.lm)  # names every field (d_mlp, ...) that differs
    if lm.cfg.block_size < T:
        raise UserError(f"the LM's block_size ({lm.cfg.block_size}) < the token shards' "
                        f"ctx_len ({T})")
    return tm, _settings(cfg, tm, sha), n


def _check_token_shard(path: str, rows: int) -> None:
    """Footer only: the shard exists, is Parquet and holds the rows the manifest says."""
    if not store.exists(path):
        raise MissingInput(f"token shard {path} listed in the token manifest is missing")
    fs, p = store.resolve(path)
    try:
        with fs.open_input_file(p) as f:
            found = pq.read_metadata(f).num_rows
    except (OSError, ValueError) as err:
        raise UserError(f"corrupt token shard {path}: {err}") from err
    if found != rows:
        raise UserError(f"token shard {path} has {found} rows, its manifest says {rows}")


def existing_state(cfg: Config, settings: dict, chunks: list[tuple[int, int]]) -> set[int]:
    """First ctx of every finished shard; raises if the dir holds another run's shards
    (unless acts.overwrite, which clears the dir). Deletes stale temporaries."""
    acts_dir = store.Layout(cfg.out).acts
    conflicts = []
    if store.exists(store.Layout(cfg.out).acts_manifest):
        old = store.acts_manifest(cfg.out)
        conflicts += [f"manifest {k}={old.get(k)!r} (now {settings[k]!r})"
                      for k in IDENTITY_KEYS if old.get(k) != settings[k]]
    wanted = {store.acts_shard_name(f): (f, n) for f, n in chunks}
    done, infos = set(), {}
    for path in store.list_files(acts_dir):
        name = path.rsplit("/", 1)[-1]
        try:
            infos[name] = store.acts_shard_info(path)
        except (OSError, ValueError) as err:  # unreadable: ours to redo (atomic writes)
            logger.warning("redoing unreadable activation shard %s (%s)", path, err)
            continue
        meta = infos[name]["meta"]
        bad = [k for k in IDENTITY_KEYS if meta.get(k) != str(settings[k])]
        if bad:
            conflicts.append(f"{name}: " + ", ".join(f"{k}={meta.get(k)!r}" for k in bad))
    if conflicts and not cfg.acts.overwrite:
        raise UserError(f"{acts_dir} holds activations from a different LM or settings "
                        f"({'; '.join(conflicts[:3])}); pass --acts.overwrite true to replace "
                        f"them, or choose another --out")
    if conflicts:
        logger.warning("acts.overwrite: deleting %d shards and the manifest in %s",
                       len(infos), acts_dir)
        store.delete(acts_dir)
        return set()
    for name, info in infos.items():
        f, n = wanted.get(name, (None, None))
        if f is None:
            logger.warning("%s/%s is not part of this run (n_contexts=%d); readers use the "
                           "manifest's file list", acts_dir, name, chunks[-1][0] + chunks[-1][1])
        elif info["rows"] == n * settings["tokens_per_context"] and \
                info["meta"].get("n_contexts") == str(n):
            done.add(f)
    _delete_temporaries(acts_dir)
    return done


def _delete_temporaries(acts_dir: str) -> None:
    fs, p = store.resolve(acts_dir)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return
    for info in fs.get_file_info(pafs.FileSelector(p)):
        if ".parquet.tmp-" in info.base_name:
            fs.delete_file(info.path)


def check_disk(cfg: Config, rows: int, d_mlp: int) -> None:
    """Log the size estimate; raise if a local target lacks the space."""
    item = 4 if cfg.acts.dtype == "float32" else 2
    need = rows * (d_mlp * item + 16)  # + ctx/pos/token; zstd usually saves ~15% on top
    target = store.Layout(cfg.out).acts
    logger.info("collection: %d rows to write, ~%.2f GB at %d B/row before compression",
                rows, need / 1e9, d_mlp * item + 16)
    if store.is_uri(target) or rows == 0:
        return
    probe = os.path.abspath(target)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    if need > free:
        raise BadOutput(f"not enough disk for {target}: collection needs ~{need / 1e9:.2f} GB "
                        f"uncompressed, {free / 1e9:.2f} GB free")


def _pool(cfg: Config) -> tuple[int, dict]:
    """(actors, map_batches resource args) for this cluster.

    An actor no node can host would make Ray Data wait forever ("cluster resources are not
    enough"): refuse that on CPU; with GPUs, warn (an autoscaler may add GPU nodes).
    """
    a, res = cfg.acts, ray.cluster_resources()
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    if a.use_gpu:
        # One actor per GPU the cluster can scale to (mono.cluster: the autoscaler's node
        # types x max_workers), --max_actors as a cap; all requested at once.
        gpus = cluster.check_gpus("--acts.use_gpu")
        if not any(n.get("GPU", 0) >= 1 and n.get("CPU", 0) >= a.cpus_per_actor for n in nodes):
            logger.warning("no node has 1 GPU + %d CPUs (acts.cpus_per_actor) yet: collection "
                           "waits for the autoscaler", a.cpus_per_actor)
        n = min(gpus, a.max_actors) if a.max_actors else gpus   # check_gpus: gpus >= 1
        return n, {"num_gpus": 1, "num_cpus": a.cpus_per_actor}
    largest = max((n.get("CPU", 0) for n in nodes), default=0)
    if a.cpus_per_actor > largest:
        raise UserError(f"acts.cpus_per_actor ({a.cpus_per_actor}) > the {largest:g} CPUs of "
                        f"the largest node: pass a smaller --cpus_per_actor")
    # Leave one CPU to Ray Data's own tasks (RAY_NOTES §1.2: a full pool deadlocks).
    n = a.max_actors or max(1, (int(res.get("CPU", 1)) - 1) // a.cpus_per_actor)
    return n, {"num_cpus": a.cpus_per_actor}


def check(cfg: Config) -> None:
    """The job's input check before Ray starts (mono.cli): `check_inputs` (token manifest
    and shard footers, the LM and its config)."""
    check_inputs(cfg)


def run(cfg: Config) -> dict:
    """Collect activation shards into <cfg.out>/acts; returns the manifest (module doc)."""
    a = cfg.acts
    tm, settings, n_ctx = check_inputs(cfg)
    chunks = plan(n_ctx, a.shard_contexts)
    done = existing_state(cfg, settings, chunks)
    todo = [(f, n) for f, n in chunks if f not in done]
    check_disk(cfg, sum(n for _, n in todo) * a.tokens_per_context, cfg.lm.d_mlp)
    stats = {"shards_written": 0, "rows_written": 0, "seconds": 0.0}
    old = (store.acts_manifest(cfg.out) if store.exists(store.Layout(cfg.out).acts_manifest)
           else {})
    if not todo and old:
        stats = old.get("last_run", stats)  # a no-op rerun
    # The Ray node that wrote each shard (this run's, else the run that wrote it before).
    nodes = {f["first"]: f["node"] for f in old.get("files", []) if "node" in f}
    if todo:
        pool = _pool(cfg)  # may refuse: before anything is touched
        store.delete(store.Layout(cfg.out).acts_manifest)  # absent = unfinished
        stats = _collect(cfg, settings, todo, len(done), pool)
        _delete_temporaries(store.Layout(cfg.out).acts)  # of attempts that died mid-write
        nodes |= {int(f): n for f, n in stats.get("node_per_shard", {}).items()}
    manifest = _manifest(cfg, settings, tm, chunks, nodes) | {"last_run": stats}
    store.write_json(store.Layout(cfg.out).acts_manifest, manifest)  # last: marks done
    logger.info("activations: %d rows (%d contexts x %d) in %d shards, %.1f MB, %s",
                manifest["rows"], n_ctx, a.tokens_per_context, len(chunks),
                manifest["bytes"] / 1e6, store.Layout(cfg.out).acts)
    return manifest


def _collect(cfg: Config, settings: dict, todo: list[tuple[int, int]], n_done: int,
             pool: tuple[int, dict]) -> dict:
    a = cfg.acts
    n_actors, resources = pool
    initial = min(n_actors, len(todo))
    logger.info("collection: %d shards to do (%d already done), %d actor(s), %s", len(todo),
                n_done, n_actors, "GPU" if a.use_gpu else "CPU")
    data_ctx = DataContext.get_current()
    saved = data_ctx.retried_map_errors, data_ctx.max_map_retries
    data_ctx.retried_map_errors, data_ctx.max_map_retries = True, MAP_RETRIES
    gpus = "num_gpus" in resources
    if gpus:  # boot the pool's GPU nodes in parallel, not one scale-up at a time
        cluster.request([{"GPU": resources["num_gpus"], "CPU": resources["num_cpus"]}] * initial)
    try:
        ds = ray.data.from_items([{"first": f, "n": n} for f, n in todo],
                                 override_num_blocks=len(todo))
        ds = ds.map_batches(
            Collector,
            fn_constructor_kwargs={
                "out": cfg.out, "settings": settings, "n_threads": a.threads_per_actor,
                "device": "cuda" if a.use_gpu else "cpu",
                "fail_once": os.environ.get(FAIL_ONCE_ENV, ""),
                "fail_mode": os.environ.get(FAIL_MODE_ENV, "raise")},
            batch_size=1, batch_format="numpy",
            # Start the whole pool at once (the work is known and evenly cut) and queue no
            # more shards on an actor than it runs at once, so late actors get work too.
            compute=ActorPoolStrategy(min_size=1, max_size=n_actors,
                                      initial_size=initial,
                                      max_tasks_in_flight_per_actor=a.cpus_per_actor + 1,
                                      max_concurrent_calls_per_actor=a.cpus_per_actor + 1,
                                      enable_true_multi_threading=True),
            **resources)
        return _progress(ds, sum(n for _, n in todo) * a.tokens_per_context)
    finally:
        data_ctx.retried_map_errors, data_ctx.max_map_retries = saved
        if gpus:
            cluster.release()  # so idle GPU nodes can be removed


def _progress(ds, total_rows: int) -> dict:
    """Drain the summaries: a tqdm bar (on a terminal), a log line every ~10 s; -> stats."""
    start = last = time.perf_counter()
    rows, nodes, first, where, n_threads = 0, {}, None, {}, set()
    with tqdm(total=total_rows, unit="vec", unit_scale=True, desc="activations",
              disable=None) as bar:
        for row in ds.iter_rows():
            rows += int(row["rows"])
            nodes[str(row["node"])] = nodes.get(str(row["node"]), 0) + 1
            where[str(int(row["first"]))] = str(row["node"])
            n_threads.add(int(row["threads"]))
            first = first or (time.perf_counter() - start, rows)  # actor start-up included
            bar.update(int(row["rows"]))
            now = time.perf_counter()
            if now - last > 10:
                last = now
                logger.info("collection: %d / %d rows (%.0f vectors/s)", rows, total_rows,
                            rows / (now - start))
    elapsed = time.perf_counter() - start
    logger.info("collection: %d rows in %.1f s (%.0f vectors/s) on %d node(s), %s torch "
                "thread(s) per actor", rows, elapsed, rows / max(elapsed, 1e-9), len(nodes),
                "/".join(map(str, sorted(n_threads))) or "?")
    # Steady state: after the first shard, i.e. without actor start-up and LM loading.
    steady = (rows - first[1]) / (elapsed - first[0]) if first and elapsed > first[0] else None
    return {"shards_written": sum(nodes.values()), "rows_written": rows, "seconds": elapsed,
            "vectors_per_s": rows / max(elapsed, 1e-9), "first_shard_s": first and first[0],
            "steady_vectors_per_s": steady, "shards_per_node": nodes,
            "node_per_shard": where, "torch_threads": sorted(n_threads)}


def _manifest(cfg: Config, settings: dict, tm: dict, chunks: list[tuple[int, int]],
              nodes: dict[int, str] | None = None) -> dict:
    acts_dir = store.Layout(cfg.out).acts
    files, P = [], cfg.acts.tokens_per_context
    for f, n in chunks:
        name = store.acts_shard_name(f)
        info = store.acts_shard_info(store.join(acts_dir, name))
        if info["rows"] != n * P or info["meta"].get("lm_sha256") != settings["lm_sha256"]:
            raise RuntimeError(f"shard {name} has {info['rows']} rows (expected {n * P}) or "
                               f"another LM: collection did not complete")
        files.append({"name": name, "first": f, "contexts": n, "rows": info["rows"],
                      "bytes": info["bytes"]} | ({"node": nodes[f]} if f in (nodes or {})
                                                 else {}))
    rows = sum(f["rows"] for f in files)
    return {
        "format": "mono.acts/1",
        "dir": acts_dir,
        "H": cfg.lm.d_mlp,
        **{k: settings[k] for k in IDENTITY_KEYS},
        "storage": f"arrow.fixed_shape_tensor<{store.ACTS_STORAGE[cfg.acts.dtype]}>[H]",
        "n_contexts": chunks[-1][0] + chunks[-1][1] if chunks else 0,
        "rows": rows,
        "bytes": sum(f["bytes"] for f in files),
        "compression": cfg.acts.compression,
        "row_group_rows": cfg.acts.row_group_rows,
        "inputs": {"tokens": store.Layout(cfg.out).tokens("train"),
                   "token_files": [f["name"] for f in tm["splits"]["train"]["files"]
                                   if chunks and f["first"] < chunks[-1][0] + chunks[-1][1]],
                   "lm": store.join(store.Layout(cfg.out).lm, store.LM_WEIGHTS)},
        "completed": [[f["first"], f["contexts"]] for f in files],
        "files": files,
        "acts_config": asdict(cfg.acts),
    }
