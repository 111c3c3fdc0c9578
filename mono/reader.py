"""Stage 3 -> 4: the readers that stream activation shards back, for SAE training,
resampling draws and Ray Data.

Reads <out>/acts/manifest.json and the part-*.parquet shards `mono.acts` writes (schema in
`mono.store`), or any list of such shards; writes nothing. Three views of the same rows:
- `ActsReader`: float32 (N, H) batches in a deterministic, resumable, shard-mixing order
  (train_sae, features);
- `LocalShardSource`: `sample(n)` uniform random rows without replacement (a single run's
  resampling; the sweep's shared draws come from `mono.resample.ResampleService`);
- `read_dataset`: a Ray Dataset over the shards (bfloat16 decoded to float32).
`local_shards` fetches remote shards once into the node's local cache for the training
readers (bounded by free disk; when they do not fit, the readers stream).

Shapes: N rows of a batch, H d_mlp.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq
import ray
import torch

from mono import store
from mono.errors import MissingInput, UserError

logger = logging.getLogger(__name__)

# Domain tag for np.random.default_rng([seed, tag, ...]) of the reading order; mono.acts
# uses 1 (positions) and 2 (shard shuffles), so the streams stay unrelated.
_WINDOW = 3


def shard_list(source) -> dict:
    """Shards of a run dir (<out>/acts/manifest.json), an acts dir (manifest.json or its
    part-*.parquet) or a list of shard paths -> {files, rows, dtype, H, row_group_rows}."""
    if isinstance(source, (list, tuple)):
        files = [str(f) for f in source]
    else:
        source = str(source)
        for manifest in (store.Layout(source).acts_manifest, store.join(source, "manifest.json")):
            if store.exists(manifest):
                m = store.read_json(manifest)
                acts_dir = manifest.rsplit("/", 1)[0]
                return {"files": [store.join(acts_dir, f["name"]) for f in m["files"]],
                        "rows": [f["rows"] for f in m["files"]], "dtype": m["dtype"],
                        "H": m["H"], "row_group_rows": m["row_group_rows"]}
        files = store.list_files(source)
    if not files:
        raise MissingInput(f"no activation shards in {source!r}: run "
                           f"`python -m ray_jobs.collect_acts` first")
    infos = [store.acts_shard_info(f) for f in files]
    fs, p = store.resolve(files[0])
    with fs.open_input_file(p) as fh:
        schema = pq.ParquetFile(fh).schema_arrow
    return {"files": files, "rows": [i["rows"] for i in infos],
            "dtype": store.acts_dtype(schema), "H": schema.field("acts").type.shape[0],
            "row_group_rows": max(max(i["row_groups"], default=1) for i in infos)}


def check_shards(shards: dict) -> None:
    """Raise UserError naming the first shard of `shards` (a `shard_list`) that is missing,
    not Parquet, or holds other rows than listed: one footer read per shard, 16 at a time
    (two requests each on object storage), so a damaged dataset stops a job before Ray
    starts rather than a trial or task mid-run."""
    def problem(path: str, rows: int) -> str | None:
        try:
            found = store.acts_shard_info(path)["rows"]
        except FileNotFoundError:
            return f"activation shard {path} is missing"
        except (OSError, ValueError) as err:  # pyarrow: ArrowInvalid, ArrowIOError
            return f"corrupt activation shard {path}: {err}"
        if found != rows:
            return f"activation shard {path} holds {found} rows, its manifest says {rows}"
        return None

    with ThreadPoolExecutor(16) as pool:
        for msg in pool.map(problem, shards["files"], shards["rows"]):
            if msg:
                raise UserError(f"{msg}: rerun `python -m ray_jobs.collect_acts` to rewrite it")


CACHE_FILL = 0.9
"""The node-local shard cache may fill at most this fraction of the free disk."""


def cache_root() -> str:
    """This node's local scratch for cached inputs: $MONO_CACHE_DIR, else <tmp>/mono-cache
    (what train_lm caches token splits in)."""
    return os.environ.get("MONO_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "mono-cache")


def local_shards(source) -> list[str] | None:
    """The activation shards of a remote `source` (URIs), fetched once into this node's
    local cache, so every trial on the node reads them from local disk: the local paths,
    in the manifest's order. None when the shards are local already, or when they do not
    fit in CACHE_FILL of the cache disk's free space (logged: the trials then stream
    them). The first process of a node copies (under a file lock, each file to a temporary
    name, then renamed); the others wait, then find the files there (size-checked)."""
    shards = shard_list(source)
    files = shards["files"]
    if not any(store.is_uri(f) for f in files):
        return None
    key = hashlib.sha256(json.dumps([files, shards["rows"]]).encode()).hexdigest()[:16]
    cache = os.path.join(cache_root(), f"acts-{key}")
    fs, _ = store.resolve(files[0])
    infos = fs.get_file_info([store.resolve(f)[1] for f in files])
    local = [os.path.join(cache, f.rsplit("/", 1)[-1]) for f in files]

    def missing() -> list[int]:
        return [i for i, (path, info) in enumerate(zip(local, infos))
                if not (os.path.exists(path) and os.path.getsize(path) == info.size)]

    todo = missing()
    if not todo:
        return local
    need = sum(infos[i].size for i in todo)
    os.makedirs(cache, exist_ok=True)
    free = shutil.disk_usage(cache).free
    if need > CACHE_FILL * free:
        logger.warning("activation shards: %.2f GB to cache do not fit in %s (%.2f GB free): "
                       "streaming them from %s instead", need / 1e9, cache, free / 1e9,
                       files[0].rsplit("/", 1)[0])
        return None
    with open(os.path.join(cache, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        todo = missing()   # another process of this node may have fetched them meanwhile
        for i in todo:
            tmp = f"{local[i]}.tmp-{os.getpid()}"
            with fs.open_input_stream(infos[i].path) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
            os.replace(tmp, local[i])
        if todo:
            logger.info("activation shards: cached %d files (%.2f GB) of %s in %s", len(todo),
                        need / 1e9, files[0].rsplit("/", 1)[0], cache)
    return local


def _open(path: str) -> pq.ParquetFile:
    fs, p = store.resolve(path)
    return pq.ParquetFile(fs.open_input_file(p))


def to_float32(x: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored rows (n, H) (fp16, fp32, or bf16 as uint16 bits) -> float32 tensor (n, H)."""
    t = torch.from_numpy(x.view(np.int16) if dtype == "bfloat16" else x)
    return (t.view(torch.bfloat16) if dtype == "bfloat16" else t).float()


class ActsReader:
    """Streams float32 (N, H) activation batches from the shards, for SAE training.

    Order, deterministic in (seed, shard list, shuffle_buffer): epoch e permutes the shards
    with default_rng([seed, 3, e]) and takes them `mix` = shuffle_buffer // row_group_rows
    at a time; window j of such a group holds row group j of each of its shards, permuted
    by default_rng([seed, 3, e, group, j]). Batches are consecutive batch_size rows of that
    stream (across windows, groups and epochs), so the position is one number, the rows
    served: `ActsReader(..., state=r.state())` continues exactly where r stopped, reading
    only the window it stopped in. A background thread reads the next window (row groups of
    different shards in parallel) and prepares `prefetch` batches ahead.

    Mixing: a batch draws from the contexts of `mix` shards (rows are shuffled within each
    shard at collection, so any row group spans most of its shard's contexts). Paper preset:
    64 shards x 1024 contexts per window, ~0.94 of a perfect shuffle's distinct contexts per
    batch of 8192 (bench/collect.py measures it). Memory: ~2 windows of shuffle_buffer rows
    in the stored dtype + `prefetch` batches.

    epochs: passes over the data (0 = endless); max_rows: stop after this many rows from the
    stream's start (0 = no limit); drop_last: drop a final short batch. with_meta: yield
    (x, {"ctx", "pos", "token"} numpy) instead of x.
    """

    def __init__(self, source, batch_size: int, *, seed: int = 0, shuffle_buffer: int = 262_144,
                 epochs: int = 1, max_rows: int = 0, drop_last: bool = True, prefetch: int = 2,
                 device: str = "cpu", with_meta: bool = False, state: dict | None = None):
        if batch_size <= 0 or shuffle_buffer <= 0 or epochs < 0 or max_rows < 0:
            raise ValueError(f"bad ActsReader sizes: batch_size={batch_size}, shuffle_buffer="
                             f"{shuffle_buffer}, epochs={epochs}, max_rows={max_rows}")
        shards = shard_list(source)
        self.files, self.file_rows = shards["files"], np.array(shards["rows"], dtype=np.int64)
        self.dtype, self.H = shards["dtype"], shards["H"]
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self.mix = max(1, shuffle_buffer // shards["row_group_rows"])
        self.rows_per_epoch = int(self.file_rows.sum())
        end = epochs * self.rows_per_epoch if epochs else float("inf")
        self.end = min(end, max_rows) if max_rows else end
        self.drop_last, self.prefetch, self.with_meta = drop_last, prefetch, with_meta
        self.columns = ["acts", "ctx", "pos", "token"] if with_meta else ["acts"]
        self.rows = 0
        if state is not None:
            mine = self._identity()
            bad = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
            if bad:
                raise ValueError(f"reader state does not match this reader: {bad}")
            self.rows = int(state["rows"])

    def _identity(self) -> dict:
        return {"seed": self.seed, "mix": self.mix, "batch_size": self.batch_size,
                "rows_per_epoch": self.rows_per_epoch, "n_files": len(self.files)}

    def state(self) -> dict:
        """The position (rows served) + what must match to resume from it."""
        return {"rows": self.rows, **self._identity()}

    def __len__(self) -> int:
        """Batches left; an endless stream (epochs=0, no max_rows) has no length."""
        if self.end == float("inf"):
            raise TypeError("an endless ActsReader (epochs=0, max_rows=0) has no len()")
        left = self.end - self.rows
        return int(left // self.batch_size if self.drop_last else -(-left // self.batch_size))

    def __iter__(self):
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        worker = threading.Thread(target=self._produce, args=(q, stop), daemon=True)
        worker.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                self.rows += len(item[0])
                yield item if self.with_meta else item[0]
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    worker.join(0.05)

    # --- the producer thread -----------------------------------------------------------

    def _groups(self, epoch: int) -> list[np.ndarray]:
        perm = np.random.default_rng([self.seed, _WINDOW, epoch]).permutation(len(self.files))
        return [perm[i:i + self.mix] for i in range(0, len(perm), self.mix)]

    def _windows(self, start: int):
        """(window rows dict, permutation) from the window holding row `start` on, and the
        offset of `start` in the first one."""
        epoch, r = divmod(start, self.rows_per_epoch)
        # Two pools: a window load (ahead) waits on row-group reads, so they cannot share one.
        with ThreadPoolExecutor(8) as io, ThreadPoolExecutor(1) as ahead:
            while True:
                for g, group in enumerate(self._groups(epoch)):
                    g_rows = int(self.file_rows[group].sum())
                    if r >= g_rows:
                        r -= g_rows
                        continue
                    yield from self._group_windows(io, ahead, epoch, g, group, r)
                    r = 0
                epoch += 1

    def _group_windows(self, pool, ahead, epoch: int, g: int, group, skip: int):
        handles = list(pool.map(_open, [self.files[i] for i in group]))
        sizes = [[h.metadata.row_group(j).num_rows for j in range(h.num_row_groups)]
                 for h in handles]
        n_windows = max(len(s) for s in sizes)

        def load(j: int) -> dict:
            parts = pool.map(lambda h: h.read_row_group(j, columns=self.columns),
                             [h for h, s in zip(handles, sizes) if j < len(s)])
            tables = list(parts)
            cols = {"acts": np.concatenate([store.acts_array(t.column("acts")) for t in tables])}
            for c in self.columns[1:]:
                cols[c] = np.concatenate([t.column(c).to_numpy() for t in tables])
            perm = np.random.default_rng([self.seed, _WINDOW, epoch, g, j]).permutation(
                len(cols["acts"]))
            return {"cols": cols, "perm": perm}

        j = 0
        while skip >= sum(s[j] for s in sizes if j < len(s)):
            skip -= sum(s[j] for s in sizes if j < len(s))
            j += 1
        nxt = ahead.submit(load, j)
        try:
            for j in range(j, n_windows):
                window = nxt.result()
                if j + 1 < n_windows:  # read the next window while this one is served
                    nxt = ahead.submit(load, j + 1)
                yield window, skip
                skip = 0
        finally:
            nxt.cancel()
            for h in handles:
                h.close()

    def _produce(self, q: queue.Queue, stop: threading.Event) -> None:
        try:
            pos, pieces, have = self.rows, [], 0
            windows = self._windows(pos) if pos < self.end else iter(())
            for window, skip in windows:
                perm = window["perm"][skip:]
                while len(perm) and pos < self.end:
                    take = int(min(self.batch_size - have, len(perm), self.end - pos))
                    pieces.append((window["cols"], perm[:take]))
                    perm, have, pos = perm[take:], have + take, pos + take
                    if have == self.batch_size:
                        if not self._put(q, stop, self._batch(pieces)):
                            windows.close()  # stops the read-ahead, closes the files
                            return
                        pieces, have = [], 0
                if pos >= self.end:
                    windows.close()
                    break
            if pieces and not self.drop_last:
                self._put(q, stop, self._batch(pieces))
            self._put(q, stop, None)
        except BaseException as err:  # surfaced in the consumer
            self._put(q, stop, err)

    def _batch(self, pieces) -> tuple:
        acts = np.concatenate([cols["acts"][idx] for cols, idx in pieces])    # (N, H)
        x = to_float32(acts, self.dtype).to(self.device)                     # (N, H)
        meta = {c: np.concatenate([cols[c][idx] for cols, idx in pieces])
                for c in self.columns[1:]}
        return x, meta

    @staticmethod
    def _put(q: queue.Queue, stop: threading.Event, item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False


class LocalShardSource:
    """Uniformly random activation rows across the shards, for dead-feature resampling.

    sample(n) draws n rows without replacement from the whole dataset (seeded by (seed,
    call number), or by its `seed` argument) and reads only the row groups that hold them,
    in parallel. Cost: ~min(n, row groups) row-group reads, so n of the order of the number
    of row groups reads everything (paper: ~250 k row groups); the sweep's ResampleService
    reads ~n / 512 groups per draw instead (a two-stage sample). Returns (n, H) float32
    numpy, rows in random order.
    """

    def __init__(self, source, seed: int = 0, threads: int = 8):
        shards = shard_list(source)
        self.files, self.dtype, self.H = shards["files"], shards["dtype"], shards["H"]
        self.starts = np.concatenate([[0], np.cumsum(shards["rows"])])  # (files + 1,)
        self.rows = int(self.starts[-1])
        self.seed, self.calls, self.threads = seed, 0, threads
        self._groups: dict[int, np.ndarray] = {}  # file -> row-group starts (footer cache)

    def sample(self, n: int, seed: int | None = None) -> np.ndarray:
        if not 0 < n <= self.rows:
            raise ValueError(f"sample size must be in [1, {self.rows}], got {n}")
        rng = np.random.default_rng([self.seed, self.calls] if seed is None else seed)
        self.calls += 1
        idx = np.sort(rng.choice(self.rows, size=n, replace=False))          # (n,)
        which = np.searchsorted(self.starts, idx, side="right") - 1          # (n,)
        jobs = [(int(f), idx[which == f] - self.starts[f]) for f in np.unique(which)]
        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            parts = list(pool.map(lambda job: self._rows(*job), jobs))
        out = np.concatenate(parts)                                          # (n, H)
        return out[rng.permutation(n)]

    def _rows(self, f: int, rows: np.ndarray) -> np.ndarray:
        handle = _open(self.files[f])
        if f not in self._groups:
            md = handle.metadata
            sizes = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
            self._groups[f] = np.concatenate([[0], np.cumsum(sizes)])
        starts = self._groups[f]
        rg = np.searchsorted(starts, rows, side="right") - 1
        parts = []
        for g in np.unique(rg):
            x = store.acts_array(handle.read_row_group(int(g), columns=["acts"]).column("acts"))
            parts.append(x[rows[rg == g] - starts[g]])
        handle.close()
        return to_float32(np.concatenate(parts), self.dtype).numpy()


def read_dataset(source, **read_args) -> ray.data.Dataset:
    """The shards as a Ray Dataset (`ray.data.read_parquet` over the manifest's files);
    `acts` comes back as an (n, H) ndarray column, bfloat16 decoded to float32."""
    shards = shard_list(source)
    ds = ray.data.read_parquet(shards["files"], **read_args)
    if shards["dtype"] == "bfloat16":
        ds = ds.map_batches(_decode_bf16, batch_format="numpy")
    return ds


def _decode_bf16(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return batch | {"acts": to_float32(np.ascontiguousarray(batch["acts"]), "bfloat16").numpy()}
