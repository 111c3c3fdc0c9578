"""Stage 5: a trained SAE over the activation shards -> per-feature tables (and the pages).

Reads <out>/acts (manifest + shards: ctx, pos, token, acts), the SAE export dir of one trial
(cfg.json + sae.safetensors), <out>/lm (c_proj, ln_f, unembedding for the logit effects) and
<out>/tokens (the context windows). Writes <out>/analysis/<trial>/:

    features.parquet   one row per feature: count, density, density class, max and mean
                       activation, activation histogram, interval counts, logit effects
    examples.json      per feature: top-k activations and value-interval samples, each with
                       (ctx, pos), the activation and its decoded context window
    summary.json       trial, SAE dir, rows scanned, L0, class counts, timings
    html/              the feature browser (mono.pages)

Two passes of Ray tasks over groups of row groups (mono.scan: bounded state per feature,
whatever the rows scanned), merged on the driver as they arrive: `TopStats` (count, sum and
the top-k activations with (ctx, pos)), then, given its max per feature, `IntervalStats`
(the paper's value intervals, each with its count and uniform samples, and a histogram).
Two passes rather than one into fixed log bins re-binned at the end: the paper's intervals
are linear in the max, unknown until the scan ends, and a second encode of the same rows is
simpler and exact. Both passes read the same rows.

Logit effects (paper: d_i W_down pi L W_unembed): the decoder row W_dec[i] through c_proj,
ln_f linearised as its Jacobian averaged over every position of a few train contexts (pi,
LayerNorm's centring, and L, its gain over each position's std, with the term along the
normalised residual the paper's sketch drops), then the tied unembedding: the mean change
of the logits when a small multiple of the direction is added to the MLP output (tests hold
it to a finite difference through the LM). Tokens that occur fewer than
`logit_min_count` times in the train token shards (`token_counts`, cached) are left out of
the ranking and of the median it is centred on: their embedding rows are barely trained and
otherwise lead the lists. The top and bottom `logit_tokens`.

Context windows: +-`window` tokens around each example, clipped at the context's edges,
from the token shards (each token file read once); decoded as one byte string per window
(never token by token: GPT-2 splits multi-byte characters across tokens, and decoding the
pieces alone gives U+FFFD). A window edge that cuts a character is widened by a token; the
highlighted span is widened to whole characters.

Limits: densities come from the rows scanned (resolution 1 / rows); ultralow needs >= 1e5
rows to mean anything. Feature ablation effects (the seed's build_website) are not computed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import ray
import torch

from mono import cluster, pages, reader, scan, store, threads
from mono.acts import tokens_identity
from mono.config import Config
from mono.errors import MissingInput, UserError
from mono.sae import SparseAutoencoder
from mono.sae_files import load_sae
from mono.scan import IntervalStats, TopStats, plan_pieces, split_tasks
from mono.tokens import gpt2

logger = logging.getLogger(__name__)

# Shapes: N rows in a batch, H d_mlp, F features, K top_k, I intervals, S samples per
# interval, B histogram bins, D d_model, V vocab.

GPT2_VOCAB = 50257  # real ids; the LM pads V to 50304 (seed), padding rows never occur
SAE_FILES = ("cfg.json", "sae.safetensors")
HEADLINE = pages.HEADLINE  # the default trial is chosen by loss recovered vs mean ablation


# --- which SAE ---------------------------------------------------------------------------


def sweep_dir(cfg: Config) -> str:
    """<storage>/<experiment> of the sweep (cfg.sweep.storage_path or <out>/sweep)."""
    return store.join(cfg.sweep.storage_path or store.Layout(cfg.out).sweep, cfg.sweep.name)


def _metric(trial: dict, key: str):
    value = trial.get(key, (trial.get("metrics") or {}).get(key))
    return float(value) if value is not None else math.nan


def best_trial(trials: list[dict], target_l0: float) -> tuple[dict, str]:
    """The finished trial (mono.sweep's trials.json entries: name, status, sae_dir,
    metrics) with the highest HEADLINE (loss_recovered_mean) among those with l0 <=
    target_l0; if none qualifies, the best overall. -> (trial, note for the user)."""
    scored = [t for t in trials if t.get("status", "done") == "done"
              and math.isfinite(_metric(t, HEADLINE))]
    if not scored:
        raise UserError(f"no finished trial in trials.json has a {HEADLINE} metric (trials "
                        f"of an older mono report only loss_recovered: rerun the sweep "
                        f"under a new --sweep.name): {[t.get('name') for t in trials]}")
    within = [t for t in scored if _metric(t, "l0") <= target_l0]
    best = max(within or scored, key=lambda t: _metric(t, HEADLINE))
    note = (f"best {HEADLINE} of {len(within)} trial(s) with L0 <= {target_l0:g}" if within
            else f"no trial has L0 <= {target_l0:g} (lowest "
                 f"{min(_metric(t, 'l0') for t in scored):.3g}); taking the best {HEADLINE} "
                 f"overall")
    return best, note


def trial_sae_dir(trial: dict, experiment: str) -> str:
    """A trials.json entry's SAE export dir (relative entries are under `experiment`)."""
    path = trial.get("sae_dir") or store.join(trial["name"], "sae")
    return path if store.is_uri(path) or os.path.isabs(path) else store.join(experiment, path)


def _is_sae_dir(path: str) -> bool:
    return all(store.exists(store.join(path, f)) for f in SAE_FILES)


def safe_name(name: str) -> str:
    """A trial name as one path component: <out>/analysis/<safe_name(trial)>/."""
    return re.sub(r"[^A-Za-z0-9._=,-]+", "_", name).strip("._") or "sae"


def resolve_trial(cfg: Config) -> tuple[str, str, str]:
    """-> (trial name, SAE export dir, how it was chosen). See AnalysisConfig.trial."""
    want, experiment = cfg.analysis.trial, sweep_dir(cfg)
    trials_path = store.join(experiment, "trials.json")
    trials = store.read_json(trials_path)["trials"] if store.exists(trials_path) else []
    if want:
        named = [t for t in trials if t.get("name") == want]
        if named and named[0].get("status", "done") != "done":
            raise UserError(f"trial {want!r} of {trials_path} is {named[0]['status']}, "
                            f"not done: it has no SAE export")
        if named:
            return safe_name(want), trial_sae_dir(named[0], experiment), f"trial {want}"
        for path in (want, store.join(want, "sae")):
            if _is_sae_dir(path):
                parent = path.rstrip("/").rsplit("/", 2)
                name = parent[-2] if parent[-1] == "sae" and len(parent) > 1 else parent[-1]
                return safe_name(name), path, f"SAE dir {path}"
        raise MissingInput(f"--trial {want!r} is neither a trial of {trials_path} "
                           f"({[t.get('name') for t in trials]}) nor an SAE export dir "
                           f"(holding {' + '.join(SAE_FILES)})")
    if trials:
        best, note = best_trial(trials, cfg.analysis.target_l0)
        return safe_name(best["name"]), trial_sae_dir(best, experiment), note
    single = store.join(cfg.out, "sae_single", "sae")
    if _is_sae_dir(single):
        return "sae_single", single, f"no {trials_path}; the single run {single}"
    raise MissingInput(f"no SAE to analyse: neither {trials_path} nor {single} exists; "
                       f"run `python -m ray_jobs.sweep_sae --out {cfg.out}` or pass --trial")


# --- the two passes, as Ray tasks ------------------------------------------------------


def _scan_all(cfg: Config, groups: list, shards: dict, sae_ref, params: dict, merged):
    """Run `scan.scan` over every group as Ray tasks, merging results into `merged` as they
    finish (driver memory: the state + the results in flight)."""
    a = cfg.analysis
    remote = ray.remote(scan.scan_task).options(num_cpus=1, num_gpus=1 if a.use_gpu else 0,
                                                max_retries=3)
    params = params | {"device": "cuda" if a.use_gpu else "cpu", "batch_rows": a.batch_rows,
                       "seed": cfg.seed}
    pending = [remote.remote(g, shards["files"], shards["dtype"], sae_ref, params)
               for g in groups]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        merged.merge(ray.get(done[0]))
    return merged


# --- logit effects -----------------------------------------------------------------------


def token_counts(out: str) -> np.ndarray:
    """(GPT2_VOCAB,) int64 occurrences of every token id in the train token shards, cached
    in <out>/analysis/token_counts.json keyed by the token manifest's identity."""
    identity = tokens_identity(store.tokens_manifest(out))
    path = store.Layout(out).token_counts
    if store.exists(path):
        cached = store.read_json(path)
        if cached.get("tokens_sha256") == identity:
            return np.asarray(cached["counts"], dtype=np.int64)
    counts = np.zeros(GPT2_VOCAB, dtype=np.int64)
    for f in store.token_files(out, "train"):
        _, toks = store.table_tokens(store.read_table(f))                    # (n, T)
        counts += np.bincount(toks.ravel(), minlength=GPT2_VOCAB)[:GPT2_VOCAB]
    store.write_json(path, {"tokens_sha256": identity, "counts": counts.tolist()})
    return counts


@torch.no_grad()
def final_residual(lm, tokens: np.ndarray) -> torch.Tensor:
    """The residual entering ln_f at every position of tokens (n, T) -> (n*T, D)."""
    site = lm.mlp_site(torch.from_numpy(tokens.astype(np.int64)))
    x = site.resid + lm.transformer.h[-1].mlp.c_proj(site.acts)              # (n, T, D)
    return x.flatten(0, 1)


@torch.no_grad()
def ln_jacobian(lm, resid: torch.Tensor) -> torch.Tensor:
    """(D, D) Jacobian of ln_f averaged over the residuals resid (N, D): J[i, j] = mean over
    positions of d ln_f(x)_i / d x_j = g_i mean_p [(delta_ij - 1/D - xn_i xn_j / D) / s_p]
    (s_p = sqrt(var_p + eps), xn = (x - mean) / s_p): LayerNorm's centring, its 1/std and
    gain, and the term along the normalised residual the paper's linearisation drops."""
    ln_f = lm.transformer.ln_f
    x = resid.double()
    D = x.shape[1]
    xc = x - x.mean(dim=1, keepdim=True)                                     # (N, D)
    inv = (xc.pow(2).mean(dim=1, keepdim=True) + ln_f.eps).rsqrt()           # (N, 1)
    xn = xc * inv
    centre = torch.eye(D, dtype=x.dtype) - 1.0 / D                           # (D, D)
    jac = inv.mean() * centre - (xn * inv).T @ xn / (len(x) * D)             # (D, D)
    return (ln_f.weight.double()[:, None] * jac).to(resid.dtype)


@torch.no_grad()
def logit_effects(lm, W_dec: torch.Tensor, jac: torch.Tensor, n: int,
                  keep: np.ndarray | None = None, chunk: int = 256):
    """Each feature's direct effect on the logits (module doc), LayerNorm linearised by its
    mean Jacobian `jac` (D, D) (`ln_jacobian`).

    W_dec (F, H); keep: the token ids to rank (default: the 50257 GPT-2 ids) -> (top ids
    (F, n), top values, bottom ids (F, n), bottom values), values relative to the median
    over the kept ids.
    """
    keep = torch.arange(GPT2_VOCAB) if keep is None else torch.as_tensor(keep)
    if len(keep) < n:
        raise ValueError(f"only {len(keep)} tokens left for the logit effects, fewer than "
                         f"analysis.logit_tokens={n}: lower analysis.logit_min_count")
    W_down = lm.transformer.h[-1].mlp.c_proj.weight                          # (D, H)
    W_U = lm.lm_head.weight[keep]                                            # (V', D)
    out = [[], [], [], []]
    for d in W_dec.split(chunk):
        u = d @ W_down.T @ jac.T                                             # (c, D) pi, L
        logits = u @ W_U.T                                                   # (c, V')
        logits -= logits.median(dim=1, keepdim=True).values
        top, bottom = logits.topk(n, dim=1), logits.topk(n, dim=1, largest=False)
        for lst, t in zip(out, (keep[top.indices], top.values, keep[bottom.indices],
                                bottom.values)):
            lst.append(t)
    return tuple(torch.cat(t).numpy() for t in out)


def token_text(enc, token: int) -> str:
    """One vocabulary entry as text; bytes that are part of a multi-byte character (GPT-2
    splits those) show as \\xNN escapes rather than U+FFFD."""
    if token >= enc.n_vocab:
        return f"<|{token}|>"
    return enc.decode_single_token_bytes(int(token)).decode("utf-8", errors="backslashreplace")


# --- context windows ---------------------------------------------------------------------


def _cont(byte: int) -> bool:
    return 0x80 <= byte < 0xC0  # a UTF-8 continuation byte


def _incomplete_tail(data: bytes) -> bool:
    """Whether data ends inside a multi-byte UTF-8 character."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if not _cont(byte):
            need = 2 if byte >= 0xC0 else 1
            need = 3 if byte >= 0xE0 else need
            need = 4 if byte >= 0xF0 else need
            return need > back
    return False


def decode_window(enc, tokens, pos: int, window: int) -> tuple[str, str, str]:
    """tokens (T,) of one context -> (left, token, right) text of the window pos +- window.

    The window's bytes are decoded as whole runs: an edge inside a character widens the
    window (a character has at most 3 continuation bytes, so 3 tokens per side suffice); the
    token's span widens to whole characters. A fragment cut by the context's own edge (its
    other bytes are not in the context) is dropped, or shown as \\xNN in the token itself.
    """
    T = len(tokens)
    lo, hi = max(0, pos - window), min(T, pos + window + 1)
    a, b = max(0, lo - 3), min(T, hi + 3)   # a character has at most 3 continuation bytes
    vocab = _vocab_bytes(enc)
    parts = [vocab[t] if t < len(vocab) else b"" for t in tokens[a:b].tolist()]  # [i - a]
    while lo > a and (not parts[lo - a] or _cont(parts[lo - a][0])):
        lo -= 1
    while hi < b and _incomplete_tail(b"".join(parts[max(lo, hi - 4) - a:hi - a])):
        hi += 1
    data = b"".join(parts[lo - a:hi - a])
    head, tail = 0, len(data)
    while head < tail and _cont(data[head]):
        head += 1
    if _incomplete_tail(data):
        tail = max(i for i in range(max(0, tail - 4), tail) if not _cont(data[i]))
    s0 = sum(len(p) for p in parts[lo - a:pos - a])                      # the token's bytes
    e0 = s0 + len(parts[pos - a])
    start, end = min(max(s0, head), tail), min(max(e0, head), tail)
    while start > head and start < tail and _cont(data[start]):
        start -= 1
    while end < tail and _cont(data[end]):
        end += 1
    # The token keeps a fragment the context's edge cut (shown as \xNN, never U+FFFD).
    start, end = min(start, s0), max(end, e0)
    return (data[head:start].decode("utf-8", errors="replace"),
            data[start:end].decode("utf-8", errors="backslashreplace"),
            data[end:tail].decode("utf-8", errors="replace"))


@functools.cache
def _vocab_bytes(enc) -> tuple[bytes, ...]:
    """Every token's bytes (one list lookup per token instead of a call into tiktoken)."""
    return tuple(enc.decode_single_token_bytes(t) for t in range(enc.n_vocab))


def fetch_windows(out: str, ctx: np.ndarray, pos: np.ndarray, window: int) -> list[tuple]:
    """(left, token, right) for every example (ctx (n,), pos (n,)), reading each token file
    that holds one of the contexts once (store.read_context per file)."""
    enc = gpt2()
    files = store.tokens_manifest(out)["splits"]["train"]["files"]
    firsts = np.array([f["first"] for f in files], dtype=np.int64)
    result: list[tuple] = [("", "", "")] * len(ctx)
    which = np.searchsorted(firsts, ctx, side="right") - 1                   # (n,)
    for fi in np.unique(which):
        sel = np.flatnonzero(which == fi)
        ids, inverse = np.unique(ctx[sel], return_inverse=True)
        windows = store.read_context(out, ids)                               # (u, T)
        for i, row in zip(sel, inverse):
            result[i] = decode_window(enc, windows[row], int(pos[i]), window)
    return result


# --- the driver --------------------------------------------------------------------------


def check_inputs(cfg: Config, sae: SparseAutoencoder, shards: dict, sae_dir: str):
    """Raise before any work if the SAE, shards and LM do not fit together."""
    if shards["H"] != sae.d_in:
        raise UserError(f"the SAE in {sae_dir} reads {sae.d_in}-wide activations but the "
                        f"shards of {store.Layout(cfg.out).acts} hold H={shards['H']}")
    for name, p in sae.named_parameters():
        if not torch.isfinite(p).all():
            raise UserError(f"the SAE in {sae_dir} has NaN/Inf in {name}")
    if not sum(shards["rows"]):
        raise UserError(f"no activation rows in {store.Layout(cfg.out).acts}")
    reader.check_shards(shards)


def density_class(density: np.ndarray, cfg: Config) -> np.ndarray:
    a = cfg.analysis
    return np.select([density == 0, density < a.ultralow_density, density > a.dense_density],
                     ["dead", "ultralow", "dense"], "low")


def check(cfg: Config) -> tuple:
    """The job's input check before Ray starts (mono.cli): the SAE to analyse, the shards
    (footers) and the LM, and that they fit together. -> (trial, sae_dir, how, sae, shards,
    lm) for `run`."""
    trial, sae_dir, how = resolve_trial(cfg)
    sae, _ = load_sae(sae_dir)
    shards = reader.shard_list(cfg.out)
    check_inputs(cfg, sae, shards, sae_dir)
    lm = store.load_lm(cfg.out)
    if lm.cfg.d_mlp != sae.d_in:
        raise UserError(f"the LM in {store.Layout(cfg.out).lm} has d_mlp={lm.cfg.d_mlp}, the "
                        f"SAE in {sae_dir} d_in={sae.d_in}")
    return trial, sae_dir, how, sae, shards, lm


@threads.pinned()  # its driver computes too: every core, not the job's 1 CPU
def run(cfg: Config) -> dict:
    """Analyse one trial's SAE into <out>/analysis/<trial>/ (module doc); -> summary dict
    (with "index": the feature browser's index.html)."""
    a, t0 = cfg.analysis, time.perf_counter()
    if a.use_gpu:
        cluster.check_gpus("--analysis.use_gpu")  # not a wait for a GPU that never comes
    trial, sae_dir, how, sae, shards, lm = check(cfg)
    logger.info("analysis: %s (%s), %d features", trial, how, sae.n_features)
    pieces = plan_pieces(shards, a.max_rows)
    # Sized from what the cluster can scale to (mono.cluster), not from the CPUs up now.
    n_tasks = a.n_tasks or 2 * max(1, int(cluster.capacity().get("CPU", 1)))
    groups = split_tasks(pieces, n_tasks)
    sae_ref = ray.put({k: v.detach().cpu().numpy() for k, v in sae.state_dict().items()})
    t_scan = time.perf_counter()
    top = _scan_all(cfg, groups, shards, sae_ref, {"kind": "top", "k": a.top_k},
                    TopStats(sae.n_features, a.top_k))
    t1 = time.perf_counter()
    max_act = top.max_act                                                    # (F,)
    inter = _scan_all(cfg, groups, shards, sae_ref,
                      {"kind": "intervals", "max_act": max_act.numpy(),
                       "n_intervals": a.n_intervals, "per_interval": a.samples_per_interval,
                       "n_bins": a.hist_bins},
                      IntervalStats(max_act, a.n_intervals, a.samples_per_interval,
                                    a.hist_bins))
    t2 = time.perf_counter()
    table, logit = feature_table(cfg, lm, sae, top, inter)
    examples = examples_json(cfg, top, inter) | {"logit": logit}
    t3 = time.perf_counter()
    adir = store.Layout(cfg.out).analysis(trial)
    classes = Counter(table.column("density_class").to_pylist())
    summary = {"trial": trial, "sae_dir": sae_dir, "chosen": how, "rows": top.rows,
               "rows_available": int(sum(shards["rows"])), "n_features": sae.n_features,
               "l0": float(top.count.sum()) / max(top.rows, 1),
               "classes": {c: classes.get(c, 0) for c in ("dead", "ultralow", "low", "dense")},
               "logit": logit, "analysis": dataclasses.asdict(a), "tasks": len(groups),
               "seconds": {"setup": t_scan - t0, "pass_top": t1 - t_scan,
                           "pass_intervals": t2 - t1, "tables": t3 - t2}}
    store.write_table_atomic(store.join(adir, "features.parquet"), table)
    # compact UTF-8: ~2/3 of the indented size (25 MB for the demo's 2048 features)
    store.write_bytes_atomic(store.join(adir, "examples.json"), json.dumps(
        examples, ensure_ascii=False, separators=(",", ":")).encode())
    summary["index"] = pages.feature_browser(adir, summary)
    summary["seconds"]["pages"] = time.perf_counter() - t3
    summary["seconds"]["total"] = time.perf_counter() - t0
    store.write_json(store.join(adir, "summary.json"), summary)
    logger.info("analysis: %d rows, L0 %.1f, %s; %s in %.1f s", top.rows, summary["l0"],
                summary["classes"], summary["index"], summary["seconds"]["total"])
    return summary


def _kept(top: TopStats, inter: IntervalStats, n_int: int) -> list[np.ndarray]:
    """Every kept example, flattened: (feature, kind, slot, act, ctx, pos) arrays; kind 0 =
    top-k (slot = rank), 1 + j = interval j (slot = sample)."""
    cols = []
    for kind, buf in ((0, top.best), (1, inter.samples)):
        g, s = buf.held()
        feat, sub = (g, torch.zeros_like(g)) if kind == 0 else (g // n_int, 1 + g % n_int)
        cols.append([feat, sub, s, buf.val[g, s], buf.ctx[g, s], buf.pos[g, s].long()])
    return [torch.cat(pair).numpy() for pair in zip(*cols)]


def examples_json(cfg: Config, top: TopStats, inter: IntervalStats) -> dict:
    """examples.json: per feature its top-k (by activation) and interval samples (each
    sorted by activation), with decoded windows."""
    n_int, F = cfg.analysis.n_intervals, len(top.count)
    feat, kind, slot, act, ctx, pos = _kept(top, inter, n_int)
    texts = fetch_windows(cfg.out, ctx, pos, cfg.analysis.window)
    per_feature = [{"top": [], "intervals": [[] for _ in range(n_int)]} for _ in range(F)]
    for i in np.lexsort((slot, kind, feat)):
        left, token, right = texts[i]
        ex = {"act": float(f"{act[i]:.6g}"), "ctx": int(ctx[i]), "pos": int(pos[i]),
              "left": left, "token": token, "right": right}
        box = per_feature[feat[i]]
        (box["top"] if kind[i] == 0 else box["intervals"][kind[i] - 1]).append(ex)
    for box in per_feature:
        for samples in box["intervals"]:
            samples.sort(key=lambda e: -e["act"])
    return {"rows": top.rows, "window": cfg.analysis.window, "n_intervals": n_int,
            "features": per_feature}


def feature_table(cfg: Config, lm, sae: SparseAutoencoder, top: TopStats,
                  inter: IntervalStats) -> tuple[pa.Table, float]:
    """features.parquet (module doc) and what the logit effects used: {"positions" (the
    Jacobian's), "min_count", "excluded" (rare tokens left out), "vocab"}."""
    F, enc, a = sae.n_features, gpt2(), cfg.analysis
    n_ctx = int(store.tokens_manifest(cfg.out)["splits"]["train"]["rows"])
    resid = final_residual(lm, store.read_context(cfg.out, np.arange(min(16, n_ctx))))
    keep = np.flatnonzero(token_counts(cfg.out) >= a.logit_min_count)
    top_ids, top_val, bot_ids, bot_val = logit_effects(lm, sae.W_dec.detach(),
                                                       ln_jacobian(lm, resid),
                                                       a.logit_tokens, keep)
    logit = {"positions": len(resid), "min_count": a.logit_min_count,
             "excluded": GPT2_VOCAB - len(keep), "vocab": GPT2_VOCAB}
    count = top.count.numpy()
    density = count / max(top.rows, 1)
    mean = np.where(count > 0, top.total.numpy() / np.maximum(count, 1), 0.0)

    def ints(rows):
        return pa.array(list(rows), pa.list_(pa.int64()))

    def texts(ids):
        return pa.array([[token_text(enc, t) for t in row] for row in ids],
                        pa.list_(pa.string()))

    table = pa.table({
        "feature": pa.array(np.arange(F, dtype=np.int32)),
        "count": pa.array(count),
        "density": pa.array(density),
        "density_class": pa.array(density_class(density, cfg)),
        "max_act": pa.array(top.max_act.numpy()),
        "mean_act": pa.array(mean.astype(np.float32)),
        "hist": ints(inter.hist.view(F, -1).numpy()),
        "interval_counts": ints(inter.counts.view(F, -1).numpy()),
        "logit_top_ids": ints(top_ids),
        "logit_top": texts(top_ids),
        "logit_top_values": pa.array(list(top_val), pa.list_(pa.float32())),
        "logit_bottom_ids": ints(bot_ids),
        "logit_bottom": texts(bot_ids),
        "logit_bottom_values": pa.array(list(bot_val), pa.list_(pa.float32())),
    })
    return table, logit
