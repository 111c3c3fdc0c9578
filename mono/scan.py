"""Stages 5 and 6: scans over activation shards that keep bounded state per feature.

Reads activation shards (local or on object storage) and an SAE's weights; writes nothing.
mono.features runs `scan` in Ray tasks (`scan_task`) over groups of row groups
(`plan_pieces`, `split_tasks`) and merges their states on the driver; mono.splitting plans
its correlation sample the same way and reads it as `scan` does (`sae_from_state`,
`batches`). Per feature, whatever the rows scanned:

- `TopStats`: count and sum of f > 0, and the top-k activations with (ctx, pos). Only
  positive activations are candidates (the seed's per-batch top-k reported zeros for
  rarely active features).
- `IntervalStats`, given the max per feature: `n_intervals` intervals evenly spaced in
  activation VALUE between 0 and the max (paper; the seed used rank quantiles), each with its
  count and `per_interval` uniform samples without replacement (every active (row, feature)
  pair draws a U(0,1) key, an interval keeps its smallest keys: exact to merge across
  tasks), and an `n_bins` histogram over the same range.

Both keep their examples in a `SmallestK` (top-k: key = -activation), fed with the batch's
nonzero (row, feature) pairs, so a batch costs the SAE encode, one nonzero pass and work on
the ~L0 x N active pairs. Sampling keys are seeded per row group (`KEYS`), so results do not
depend on how row groups are spread over tasks.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import torch

from mono import cluster, reader, store, threads
from mono.sae import SparseAutoencoder

# Shapes: N rows in a batch, F features, K top_k, I intervals, S samples per interval,
# B histogram bins.

KEYS = 7  # domain tag for the interval-sampling keys, np.random.default_rng([seed, 7, ...])


class SmallestK:
    """For each of G groups, the S entries with the smallest keys seen, with their payload
    (activation, ctx, pos): (G, S) buffers, independent of how many entries were offered.

    `offer` first drops every entry whose key is not below its group's current S-th key, so
    once the buffers fill, a batch costs a gather and a compare per entry and a sort of the
    few survivors (plus their groups' held entries).
    """

    def __init__(self, groups: int, size: int):
        self.key = torch.full((groups, size), math.inf, dtype=torch.float64)   # (G, S)
        self.val = torch.zeros(groups, size)                                  # (G, S)
        self.ctx = torch.full((groups, size), -1, dtype=torch.int64)          # (G, S)
        self.pos = torch.full((groups, size), -1, dtype=torch.int32)          # (G, S)

    def offer(self, g, key, val, ctx, pos) -> None:
        """Entries (n,) each: group, key (float64), activation, ctx, pos."""
        new = key < self.key[g, -1]
        if not bool(new.any()):
            return
        g, key, val, ctx, pos = g[new], key[new], val[new], ctx[new], pos[new]
        rows = torch.unique(g)                                               # touched groups
        held = torch.isfinite(self.key[rows])                                # (u, S)
        g = torch.cat([rows.unsqueeze(1).expand_as(held)[held], g])
        key, val, ctx, pos = (torch.cat([buf[rows][held], x]) for buf, x in (
            (self.key, key), (self.val, val), (self.ctx, ctx), (self.pos, pos)))
        order = torch.argsort(key)
        order = order[torch.argsort(g[order], stable=True)]   # by group, then by key
        g, key, val, ctx, pos = g[order], key[order], val[order], ctx[order], pos[order]
        rank = torch.arange(len(g)) - torch.searchsorted(g, g)               # within group
        keep = rank < self.key.shape[1]
        g, rank = g[keep], rank[keep]
        self.key[rows] = math.inf
        self.key[g, rank], self.val[g, rank] = key[keep], val[keep]
        self.ctx[g, rank], self.pos[g, rank] = ctx[keep], pos[keep]

    def held(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(group, slot) of every filled entry, slots in key order."""
        return torch.isfinite(self.key).nonzero(as_tuple=True)

    def merge(self, other: SmallestK) -> None:
        g, s = other.held()
        self.offer(g, other.key[g, s], other.val[g, s], other.ctx[g, s], other.pos[g, s])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.key, self.val, self.ctx, self.pos))


class TopStats:
    """Pass 1 state: per feature the count and sum of f > 0, and the top-k activations with
    their (ctx, pos) (a SmallestK keyed by -activation: positive activations only, where the
    seed's per-batch top-k reported zeros). Size F*(16 + 20K) bytes whatever the rows."""

    def __init__(self, n_features: int, k: int):
        self.rows = 0
        self.count = torch.zeros(n_features, dtype=torch.int64)              # (F,)
        self.total = torch.zeros(n_features, dtype=torch.float64)            # (F,)
        self.best = SmallestK(n_features, k)                                 # (F, K)

    def update(self, f: torch.Tensor, ctx: torch.Tensor, pos: torch.Tensor) -> None:
        """f (N, F) >= 0, ctx (N,) int64, pos (N,) int32, all on the CPU."""
        self.rows += f.shape[0]
        r, c = f.nonzero(as_tuple=True)                                      # (nnz,) each
        v = f[r, c]                                                          # (nnz,)
        self.count += torch.bincount(c, minlength=len(self.count))
        self.total += torch.bincount(c, weights=v.double(), minlength=len(self.total))
        self.best.offer(c, -v.double(), v, ctx[r], pos[r])

    @property
    def max_act(self) -> torch.Tensor:
        """(F,) largest activation per feature (0 for a feature that never fired)."""
        return torch.where(torch.isfinite(self.best.key[:, 0]), self.best.val[:, 0], 0.0)

    def merge(self, other: TopStats) -> None:
        self.rows += other.rows
        self.count += other.count
        self.total += other.total
        self.best.merge(other.best)

    def nbytes(self) -> int:
        return self.count.numel() * 16 + self.best.nbytes()


class IntervalStats:
    """Pass 2 state, given each feature's max: per feature `n_intervals` value intervals
    [0, max/I), [max/I, 2max/I), ..., [(I-1)max/I, max] with counts and S uniform samples
    each (active values only, so the first starts above 0), and a B-bin histogram over the
    same range. Size F*(I*S*20 + I*8 + B*8) bytes, independent of the rows.

    Sampling: each active (row, feature) pair draws a key u ~ U(0, 1) (seeded per piece);
    an interval keeps the S pairs with the smallest keys (a SmallestK), a uniform sample
    without replacement of its pairs; the union of two states keeps the S smallest again.
    """

    def __init__(self, max_act: torch.Tensor, n_intervals: int, per_interval: int,
                 n_bins: int):
        F = len(max_act)
        self.max_act, self.I, self.B = max_act.float(), n_intervals, n_bins
        self.counts = torch.zeros(F * n_intervals, dtype=torch.int64)        # (F*I,)
        self.hist = torch.zeros(F * n_bins, dtype=torch.int64)               # (F*B,)
        self.samples = SmallestK(F * n_intervals, per_interval)              # (F*I, S)

    def update(self, f: torch.Tensor, ctx: torch.Tensor, pos: torch.Tensor,
               rng: np.random.Generator) -> None:
        """f (N, F) >= 0, ctx (N,), pos (N,); rng draws the sampling keys."""
        r, c = f.nonzero(as_tuple=True)                                      # (nnz,) each
        v = f[r, c]                                                          # (nnz,)
        frac = v / self.max_act[c].clamp_min(1e-30)                          # (nnz,) in (0, 1]
        j = (frac * self.I).long().clamp_(0, self.I - 1)
        b = (frac * self.B).long().clamp_(0, self.B - 1)
        g = c * self.I + j                                                   # interval id
        self.counts += torch.bincount(g, minlength=len(self.counts))
        self.hist += torch.bincount(c * self.B + b, minlength=len(self.hist))
        key = torch.from_numpy(rng.random(len(v)))                           # (nnz,) float64
        self.samples.offer(g, key, v, ctx[r], pos[r])

    def merge(self, other: IntervalStats) -> None:
        self.counts += other.counts
        self.hist += other.hist
        self.samples.merge(other.samples)

    def nbytes(self) -> int:
        return (self.counts.numel() + self.hist.numel()) * 8 + self.samples.nbytes()


def open_shard(path: str) -> pq.ParquetFile:
    fs, p = store.resolve(path)
    return pq.ParquetFile(fs.open_input_file(p))


def plan_pieces(shards: dict, max_rows: int) -> list[tuple[int, int, int]]:
    """[(file index, row group, rows to take from its start)] covering >= max_rows rows (0 =
    all), the same fraction of every shard (rows are shuffled within a shard at collection,
    so a shard's first rows are a uniform sample of it)."""
    total = sum(shards["rows"])
    frac = 1.0 if not max_rows or max_rows >= total else max_rows / total
    pieces = []
    for fi, path in enumerate(shards["files"]):
        want = math.ceil(shards["rows"][fi] * frac - 1e-9)
        handle = open_shard(path)
        sizes = [handle.metadata.row_group(j).num_rows for j in range(handle.num_row_groups)]
        handle.close()
        for j, n in enumerate(sizes):
            if want <= 0:
                break
            pieces.append((fi, j, min(n, want)))
            want -= n
    return pieces


def split_tasks(pieces: list, n_tasks: int) -> list[list]:
    """Contiguous groups of pieces with about equal rows, at most n_tasks of them."""
    total = sum(p[2] for p in pieces)
    groups, current, acc = [], [], 0
    per = total / max(1, min(n_tasks, len(pieces)))
    for p in pieces:
        current.append(p)
        acc += p[2]
        if acc >= per * (len(groups) + 1) - 1e-9:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


def sae_from_state(state: dict, device: str = "cpu") -> SparseAutoencoder:
    """The SAE of a state dict of numpy arrays (what a task gets from the object store), in
    eval mode on `device`."""
    H, F = state["W_enc"].shape
    sae = SparseAutoencoder(H, F, l1_coeff=0.0)
    sae.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    return sae.to(device).eval()


def batches(pieces: list, files: list[str], dtype: str, batch_rows: int,
            columns: tuple[str, ...] = ()):
    """The rows of `pieces` in order, `batch_rows` at a time: yields (file index, row group,
    s, xb, table), xb (N, H) float32 the piece's rows s:s + N (writable), table the piece's
    Arrow table (`columns` + acts, its first `take` rows; one object for all of a piece's
    batches). s == 0 starts a piece, also when a piece repeats."""
    for fi, rg, take in pieces:
        handle = open_shard(files[fi])
        table = handle.read_row_group(rg, columns=[*columns, "acts"]).slice(0, take)
        handle.close()
        x = store.acts_array(table.column("acts"), dtype)                    # (n, H)
        for s in range(0, take, batch_rows):
            yield fi, rg, s, reader.to_float32(np.array(x[s:s + batch_rows]), dtype), table


def scan(pieces: list, files: list[str], dtype: str, sae_state: dict, params: dict):
    """Encode the rows of `pieces` and accumulate one pass's state (no Ray needed).

    params: kind ("top" or "intervals"), k / max_act, n_intervals, per_interval, n_bins,
    batch_rows, seed, device. Returns a TopStats or an IntervalStats (on the CPU).
    """
    device = cluster.torch_device(params.get("device", "cpu"))
    sae = sae_from_state(sae_state, device)
    if params["kind"] == "top":
        state = TopStats(sae.n_features, params["k"])
    else:
        state = IntervalStats(torch.from_numpy(np.array(params["max_act"])),
                              params["n_intervals"], params["per_interval"], params["n_bins"])
    for fi, rg, s, xb, table in batches(pieces, files, dtype, params["batch_rows"],
                                        ("ctx", "pos")):
        if s == 0:  # a new piece: its ctx, pos and sampling keys (seeded per row group)
            ctx = torch.from_numpy(table.column("ctx").to_numpy().copy())  # Arrow's: read-only
            pos = torch.from_numpy(table.column("pos").to_numpy().astype(np.int32))
            rng = np.random.default_rng([params["seed"], KEYS, fi, rg])
        with torch.no_grad():
            f = sae.encode(xb.to(device)).cpu()                              # (N, F)
        if params["kind"] == "top":
            state.update(f, ctx[s:s + len(f)], pos[s:s + len(f)])
        else:
            state.update(f, ctx[s:s + len(f)], pos[s:s + len(f)], rng)
    return state


def scan_task(*args):
    """`scan` as a Ray task: on its one reserved CPU's thread (mono/threads.py)."""
    threads.pin()
    return scan(*args)
