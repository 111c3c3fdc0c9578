"""Feature splitting: features of dictionaries of growing size matched across sizes.

Towards Monosemanticity trains dictionaries of 512 ... 131,072 features on the same
activations (runs A/0 ... A/5) and shows features splitting into families as the dictionary
grows. This stage does that analysis for one finished sweep trial per dictionary size
(`SweepConfig.n_features` makes size a sweep axis; by default the sizes at the l1/lr of the
sweep's best trial, else `SplittingConfig.trials`).

Reads the sweep's trials.json and each trial's SAE export, <out>/acts (a shared sample of
rows), and each trial's <out>/analysis/<trial>/ (run here when missing and
splitting.analyze is set: the family pages link to its feature pages). Writes
<out>/splitting/ (store.Layout.splitting):

    matches.parquet   one row per feature of every size: size (0 = smallest), n_features,
                      feature; parents / parents_cos (the `candidates` nearest decoder
                      directions in the next smaller dictionary) and each one's activation
                      correlation parents_corr; parent, parent_cos, parent_corr (the nearest);
                      matched (linked to one of them);
                      children / children_cos (the features of the next larger dictionary
                      linked to it), split_factor (how many), best_child / best_child_cos
                      (its nearest there, linked or not); family (-1: unlinked); density on
                      the sample; x, y on the map
    families.json     every family: id, members [[size, feature], ...], sizes, top tokens
    summary.json      the trials, per size the fraction with a close match one size down
                      and the split-factor distribution, the largest families, timings
    html/             the families index, one page per family, the map (mono.family_pages)

and rewrites each matched trial's feature pages with their parent and children in the
other sizes (pages.feature_browser's `extra` hook).

Matching, for each pair of adjacent sizes (small S, large L, decoder rows unit-norm):
  - decoder cosine: cos(i, j) = W_dec_S[i] . W_dec_L[j], in block x block products over
    both dictionaries (memory block^2 floats + O(F) running results, however large the
    dictionaries), keeping for each L feature its `candidates` best S features and for each
    S feature its best L feature. The nearest parent is the first candidate.
  - activation correlation: Pearson correlation of f_S[i] and f_L[j] over a shared sample
    of rows (the first rows of every shard, in proportion: rows are shuffled within a shard
    at collection, so this is a uniform sample, and the same for every size), for the
    candidate pairs; Ray tasks over groups of row groups (as mono.features scans) return
    the sums sum f, sum f^2, sum f_S[i] f_L[j], merged on the driver.
A link is a candidate pair with cosine >= threshold between two features that fire on the
sample (a dead feature's direction is no evidence of anything). Families are the connected
components of the link graph over all sizes with two or more features: a graph, not a tree,
since an L feature linked to two S features merges them. Split factor of an S feature: the number of
L features linked to it (0: no close successor; 1: kept; >= 2: split).

Map: every decoder direction of every size, embedded in 2-D by UMAP with the cosine metric
(the paper's map was a UMAP; umap-learn) or PCA (map_method).

Limits: correlations are computed for the decoder-cosine candidates only (all pairs would
be F_S x F_L sums per task); correlation over a sample resolves only features that fire on
it (density >= ~1 / sample_rows; others get correlation 0).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import ray
import torch

from mono import family_pages, features, pages, reader, scan, store, threads
from mono.config import Config
from mono.errors import MissingInput, UserError
from mono.sae_files import load_sae

logger = logging.getLogger(__name__)

# Shapes: S features of the smaller dictionary, L of the larger, H d_mlp, K candidates,
# P candidate pairs, N rows of a batch.

PAIR_CHUNK_ELEMENTS = 1 << 23
"""Elements of the (N, pairs) products a correlation task forms at once (32 MB float32)."""


# --- which trials ------------------------------------------------------------------------


def choose_trials(cfg: Config) -> list[dict]:
    """One finished trial per dictionary size, smallest first: [{name, sae_dir, n_features,
    l1_coeff, lr, analysis}] (analysis: the trial's <out>/analysis/<name>/)."""
    exp = features.sweep_dir(cfg)
    path = store.join(exp, "trials.json")
    if not store.exists(path):
        raise MissingInput(f"no {path}: run the sweep first (python -m ray_jobs.sweep_sae "
                           f"--out {cfg.out} --n_features 256 512 1024)")
    trials = [t for t in store.read_json(path)["trials"] if t.get("status") == "done"]
    if cfg.splitting.trials:
        by_name = {t["name"]: t for t in trials}
        missing = [n for n in cfg.splitting.trials if n not in by_name]
        if missing:
            raise UserError(f"--trials {missing} are not finished trials of {path}: "
                            f"{sorted(by_name)}")
        chosen = [by_name[n] for n in cfg.splitting.trials]
    else:
        if not trials:
            raise UserError(f"no finished trial in {path}")
        best, _ = features.best_trial(trials, cfg.analysis.target_l0)
        chosen = [t for t in trials if t["l1_coeff"] == best["l1_coeff"]
                  and t["lr"] == best["lr"]]
    out = []
    for t in chosen:
        sae_dir = features.trial_sae_dir(t, exp)
        n = int(store.read_json(store.join(sae_dir, "cfg.json"))["n_features"])
        out.append({"name": t["name"], "sae_dir": sae_dir, "n_features": n,
                    "l1_coeff": t["l1_coeff"], "lr": t["lr"],
                    "analysis": store.Layout(cfg.out).analysis(features.safe_name(t["name"]))})
    out.sort(key=lambda t: t["n_features"])
    sizes = [t["n_features"] for t in out]
    if len(set(sizes)) != len(sizes) or len(sizes) < 2:
        raise UserError(f"feature splitting needs one trial for each of >= 2 dictionary "
                        f"sizes, got sizes {sizes} ({[t['name'] for t in out]}); sweep with "
                        f"--n_features 256 512 1024 or pass --trials")
    return out


# --- decoder cosine ----------------------------------------------------------------------


def unit_rows(W: torch.Tensor) -> torch.Tensor:
    """(F, H) -> float32 rows of unit norm (a zero row stays zero)."""
    W = W.detach().float()
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def decoder_matches(small: torch.Tensor, large: torch.Tensor, k: int, block: int = 4096):
    """Nearest decoder directions across two dictionaries, in blocks.

    small (S, H), large (L, H) unit rows -> (parents (L, K) int64, parents_cos (L, K)
    float32, best descending; best_child (S,) int64, best_child_cos (S,) float32). Memory:
    one (block, block) product and its (block, K + block) copy for top-k at a time.
    """
    S, L, k = small.shape[0], large.shape[0], min(k, small.shape[0])
    dev = {"device": large.device}   # runs where the decoders are (CPU or CUDA)
    parents = torch.empty(L, k, dtype=torch.int64, **dev)
    parents_cos = torch.empty(L, k, **dev)
    child_cos = torch.full((S,), -2.0, **dev)
    child = torch.zeros(S, dtype=torch.int64, **dev)
    for j0 in range(0, L, block):
        lb = large[j0:j0 + block]                                            # (b, H)
        best_v = torch.full((len(lb), k), -2.0, **dev)
        best_i = torch.zeros(len(lb), k, dtype=torch.int64, **dev)
        for i0 in range(0, S, block):
            sims = lb @ small[i0:i0 + block].T                               # (b, a)
            best_v, pos = torch.cat([best_v, sims], dim=1).topk(k, dim=1)
            # positions < k are the running best, the others columns of this block
            best_i = torch.where(pos < k, best_i.gather(1, pos.clamp(max=k - 1)),
                                 pos - k + i0)
            col_v, col_i = sims.max(dim=0)                                   # (a,)
            seg = slice(i0, i0 + sims.shape[1])
            better = col_v > child_cos[seg]
            child_cos[seg] = torch.where(better, col_v, child_cos[seg])
            child[seg] = torch.where(better, col_i + j0, child[seg])
        parents[j0:j0 + len(lb)], parents_cos[j0:j0 + len(lb)] = best_i, best_v
    return tuple(t.cpu().numpy() for t in (parents, parents_cos, child, child_cos))


# --- activation correlation over a shared sample ---------------------------------------


def correlation_sums(pieces: list, files: list[str], dtype: str, saes: list[dict],
                     pairs: list[np.ndarray], batch_rows: int) -> dict:
    """One task's sums over the rows of `pieces` (no Ray needed).

    saes: state dicts (numpy) smallest first; pairs[l] (P_l, 2): (small feature, large
    feature) of sizes l and l + 1. -> {"rows", "sum": [(F,)], "sq": [(F,)], "fired": [(F,)],
    "cross": [(P_l,)]}, float64.
    """
    models = [scan.sae_from_state(state) for state in saes]
    pair_t = [torch.from_numpy(np.array(p)) for p in pairs]   # writable copies
    acc = {"rows": 0, "sum": [torch.zeros(m.n_features, dtype=torch.float64) for m in models],
           "sq": [torch.zeros(m.n_features, dtype=torch.float64) for m in models],
           "fired": [torch.zeros(m.n_features, dtype=torch.float64) for m in models],
           "cross": [torch.zeros(len(p), dtype=torch.float64) for p in pairs]}
    for _, _, _, xb, _ in scan.batches(pieces, files, dtype, batch_rows):    # xb (N, H)
        acc["rows"] += len(xb)
        chunk = max(1, PAIR_CHUNK_ELEMENTS // len(xb))
        prev = None
        for i, m in enumerate(models):  # two sizes' f at a time: (N, F_i) and (N, F_i+1)
            with torch.no_grad():
                f = m.encode(xb)                                             # (N, F)
            acc["sum"][i] += f.sum(0, dtype=torch.float64)
            acc["sq"][i] += f.double().pow(2).sum(0)
            acc["fired"][i] += (f > 0).sum(0)
            if prev is not None:
                p = pair_t[i - 1]
                for c0 in range(0, len(p), chunk):
                    pc = p[c0:c0 + chunk]
                    acc["cross"][i - 1][c0:c0 + len(pc)] += (
                        prev[:, pc[:, 0]] * f[:, pc[:, 1]]).sum(0, dtype=torch.float64)
            prev = f
    return {k: v if k == "rows" else [t.numpy() for t in v] for k, v in acc.items()}


def correlation_task(*args):
    """`correlation_sums` as a Ray task: on its one reserved CPU's thread (mono/threads.py)."""
    threads.pin()
    return correlation_sums(*args)


def _merge_sums(total: dict | None, part: dict) -> dict:
    if total is None:  # arrays from the object store are read-only: copy the first
        return {k: v if k == "rows" else [a.copy() for a in v] for k, v in part.items()}
    total["rows"] += part["rows"]
    for key in ("sum", "sq", "fired", "cross"):
        for a, b in zip(total[key], part[key]):
            a += b
    return total


def pearson(sums: dict, pairs: list[np.ndarray]) -> list[np.ndarray]:
    """Per level, the (P_l,) correlations of the pairs from the merged sums (0 where a
    feature never fired on the sample)."""
    n = max(sums["rows"], 1)
    mean = [s / n for s in sums["sum"]]
    var = [np.maximum(q / n - m ** 2, 0.0) for q, m in zip(sums["sq"], mean)]
    out = []
    for lvl, p in enumerate(pairs):
        a, b = p[:, 0], p[:, 1]
        cov = sums["cross"][lvl] / n - mean[lvl][a] * mean[lvl + 1][b]
        den = np.sqrt(var[lvl][a] * var[lvl + 1][b])
        out.append(np.where(den > 0, cov / np.where(den > 0, den, 1.0), 0.0).astype(np.float32))
    return out


def correlations(cfg: Config, saes: list, pairs: list[np.ndarray]) -> tuple[list, list, int]:
    """Ray tasks over the shared sample -> (per level (P_l,) correlations, per size (F,)
    densities on the sample, rows)."""
    sp = cfg.splitting
    shards = reader.shard_list(cfg.out)
    pieces = scan.plan_pieces(shards, sp.sample_rows)
    n_tasks = sp.n_tasks or 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    groups = scan.split_tasks(pieces, n_tasks)
    # one object each (refs nested in a list would reach the task unresolved)
    saes_ref = ray.put([{k: v.detach().cpu().numpy() for k, v in m.state_dict().items()}
                        for m in saes])
    pairs_ref = ray.put(pairs)
    remote = ray.remote(correlation_task).options(num_cpus=1, max_retries=3)
    pending = [remote.remote(g, shards["files"], shards["dtype"], saes_ref, pairs_ref,
                             sp.batch_rows) for g in groups]
    total = None
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        total = _merge_sums(total, ray.get(done[0]))
    density = [f / max(total["rows"], 1) for f in total["fired"]]
    return pearson(total, pairs), density, total["rows"]


# --- links and families ------------------------------------------------------------------


def link_mask(parents: np.ndarray, parents_cos: np.ndarray, threshold: float,
              alive_small: np.ndarray, alive_large: np.ndarray) -> np.ndarray:
    """(L, K) bool: candidate pair linked (cosine >= threshold, both features alive)."""
    return (parents_cos >= threshold) & alive_large[:, None] & alive_small[parents]


def link_graph(sizes: list[int], parents: list[np.ndarray], links: list[np.ndarray]
               ) -> tuple[np.ndarray, np.ndarray]:
    """Links (link_mask per level) -> (family per feature of every
    size, concatenated smallest first, -1 where unlinked; link count per feature). Families
    are the connected components with >= 2 features, numbered by size (largest first),
    ties by their first member."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    offsets = np.concatenate([[0], np.cumsum(sizes)])
    rows, cols = [], []
    for lvl, (par, linked) in enumerate(zip(parents, links)):
        child, slot = np.nonzero(linked)
        rows.append(offsets[lvl + 1] + child)
        cols.append(offsets[lvl] + par[child, slot])
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    n = int(offsets[-1])
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    degree = np.bincount(np.concatenate([rows, cols]), minlength=n)
    count = np.bincount(label)
    first = np.full(len(count), n)
    np.minimum.at(first, label, np.arange(n))
    multi = np.flatnonzero(count >= 2)
    order = multi[np.lexsort((first[multi], -count[multi]))]
    family_of = np.full(len(count), -1)
    family_of[order] = np.arange(len(order))
    return family_of[label], degree


def children_of(n_small: int, parents: np.ndarray, parents_cos: np.ndarray,
                linked: np.ndarray) -> tuple[list[list[int]], list[list[float]]]:
    """For each small feature, the large features linked to it (link_mask), best first,
    and their cosines."""
    child, slot = np.nonzero(linked)
    par, cos = parents[child, slot], parents_cos[child, slot]
    order = np.lexsort((-cos, par))
    kids: list[list[int]] = [[] for _ in range(n_small)]
    scores: list[list[float]] = [[] for _ in range(n_small)]
    for i in order:
        kids[par[i]].append(int(child[i]))
        scores[par[i]].append(float(cos[i]))
    return kids, scores


# --- the map -----------------------------------------------------------------------------


def embed(directions: np.ndarray, method: str, seed: int) -> np.ndarray:
    """(n, H) unit decoder directions -> (n, 2) float32 map coordinates."""
    n = len(directions)
    if method == "umap" and n > 3:
        import umap  # umap-learn: numba-compiled, imported only here

        reducer = umap.UMAP(n_components=2, metric="cosine", random_state=seed, n_jobs=1,
                            n_neighbors=min(15, n - 1), init="random" if n < 16 else "spectral")
        return reducer.fit_transform(directions).astype(np.float32)
    centred = directions - directions.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return (centred @ vt[:2].T).astype(np.float32)


# --- the stage ---------------------------------------------------------------------------


def ensure_analyses(cfg: Config, trials: list[dict]) -> None:
    """Analyse (mono.features.run) each trial lacking <out>/analysis/<trial>/ tables."""
    for t in trials:
        if store.exists(store.join(t["analysis"], "features.parquet")):
            continue
        if not cfg.splitting.analyze:
            logger.info("splitting: %s has no analysis (splitting.analyze is off)", t["name"])
            continue
        logger.info("splitting: analysing %s (%d features)", t["name"], t["n_features"])
        features.run(dataclasses.replace(
            cfg, analysis=dataclasses.replace(cfg.analysis, trial=t["name"])))


def match(cfg: Config, saes: list) -> dict:
    """Decoder cosine and activation correlation for every pair of adjacent sizes, links,
    families and the map; -> the columns of matches.parquet (numpy / lists) + timings."""
    sp, t0 = cfg.splitting, time.perf_counter()
    dirs = [unit_rows(m.W_dec) for m in saes]
    sizes = [m.n_features for m in saes]
    parents, parents_cos, best_child, best_child_cos = [], [], [], []
    for small, large in zip(dirs, dirs[1:]):
        p, pc, c, cc = decoder_matches(small, large, sp.candidates, sp.block)
        parents.append(p)
        parents_cos.append(pc)
        best_child.append(c)
        best_child_cos.append(cc)
    t1 = time.perf_counter()
    pairs = [np.stack([p.reshape(-1), np.repeat(np.arange(len(p)), p.shape[1])], 1)
             for p in parents]                                    # (small, large) per pair
    corr, density, rows = correlations(cfg, saes, pairs)
    parents_corr = [c.reshape(p.shape) for c, p in zip(corr, parents)]
    t2 = time.perf_counter()
    xy = embed(torch.cat(dirs).numpy(), sp.map_method, cfg.seed)
    t3 = time.perf_counter()
    cols = assemble(sizes, parents, parents_cos, parents_corr, best_child, best_child_cos,
                    np.concatenate(density), xy, sp.threshold)
    return {"columns": cols, "sample_rows": rows,
            "seconds": {"decoder_cosine": t1 - t0, "correlation": t2 - t1,
                        "families_and_map": t3 - t2}}


def assemble(sizes: list[int], parents: list, parents_cos: list, parents_corr: list,
             best_child: list, best_child_cos: list, density: np.ndarray, xy: np.ndarray,
             threshold: float) -> dict:
    """Per-level match arrays (level l: sizes l -> l + 1) -> matches.parquet's columns, one
    entry per feature of every size, smallest size first (module doc)."""
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    alive = [np.asarray(density)[offsets[s]:offsets[s + 1]] > 0 for s in range(len(sizes))]
    links = [link_mask(p, c, threshold, alive[lvl], alive[lvl + 1])
             for lvl, (p, c) in enumerate(zip(parents, parents_cos))]
    family, degree = link_graph(sizes, parents, links)
    cols: dict[str, list] = {k: [] for k in (
        "size", "n_features", "feature", "parents", "parents_cos", "parents_corr", "parent",
        "parent_cos", "parent_corr", "matched", "children", "children_cos", "split_factor",
        "best_child", "best_child_cos")}
    for s, F in enumerate(sizes):
        cols["size"] += [s] * F
        cols["n_features"] += [F] * F
        cols["feature"] += range(F)
        if s == 0:
            for key in ("parents", "parents_cos", "parents_corr"):
                cols[key] += [[] for _ in range(F)]
            cols["parent"] += [-1] * F
            cols["parent_cos"] += [np.nan] * F
            cols["parent_corr"] += [np.nan] * F
            cols["matched"] += [False] * F
        else:
            p, pc, pr = parents[s - 1], parents_cos[s - 1], parents_corr[s - 1]
            cols["parents"] += p.tolist()
            cols["parents_cos"] += pc.tolist()
            cols["parents_corr"] += pr.tolist()
            cols["parent"] += p[:, 0].tolist()
            cols["parent_cos"] += pc[:, 0].tolist()
            cols["parent_corr"] += pr[:, 0].tolist()
            cols["matched"] += links[s - 1].any(axis=1).tolist()
        if s + 1 < len(sizes):
            kids, scores = children_of(F, parents[s], parents_cos[s], links[s])
            cols["children"] += kids
            cols["children_cos"] += scores
            cols["split_factor"] += [len(k) for k in kids]
            cols["best_child"] += best_child[s].tolist()
            cols["best_child_cos"] += best_child_cos[s].tolist()
        else:
            cols["children"] += [[] for _ in range(F)]
            cols["children_cos"] += [[] for _ in range(F)]
            cols["split_factor"] += [-1] * F
            cols["best_child"] += [-1] * F
            cols["best_child_cos"] += [np.nan] * F
    cols["family"] = family.tolist()
    cols["links"] = degree.tolist()
    cols["density"] = np.asarray(density, dtype=float).tolist()
    cols["x"], cols["y"] = xy[:, 0].tolist(), xy[:, 1].tolist()
    return cols


def matches_table(cols: dict) -> pa.Table:
    ints, floats = pa.list_(pa.int64()), pa.list_(pa.float32())
    types = {"parents": ints, "children": ints, "parents_cos": floats,
             "parents_corr": floats, "children_cos": floats}
    return pa.table({k: pa.array(v, type=types.get(k)) for k, v in cols.items()})


def size_summary(sizes: list[int], cols: dict) -> list[dict]:
    """Per size, over its features alive on the sample: alive, matched (linked to a feature
    one size down; absent for the smallest) and its fraction, mean best-parent cosine and
    correlation, the split factors' distribution {factor: count}."""
    size = np.asarray(cols["size"])
    live = np.asarray(cols["density"]) > 0
    out = []
    for s, F in enumerate(sizes):
        sel = (size == s) & live
        entry = {"size": s, "n_features": F, "alive": int(sel.sum())}
        if s > 0:
            matched = np.asarray(cols["matched"])[sel]
            entry |= {"matched": int(matched.sum()),
                      "matched_fraction": float(matched.mean()) if sel.any() else 0.0,
                      "mean_parent_cos": float(np.mean(np.asarray(cols["parent_cos"])[sel])),
                      "mean_parent_corr": float(np.mean(np.asarray(cols["parent_corr"])[sel]))}
        if s + 1 < len(sizes):
            factors = Counter(np.asarray(cols["split_factor"])[sel].tolist())
            entry["split_factors"] = {str(k): factors[k] for k in sorted(factors)}
        out.append(entry)
    return out


def families_json(cols: dict, tokens: dict) -> list[dict]:
    """Every family: {id, members [[size, feature]], sizes, n_features per size, tokens}
    (tokens: the most common top activating tokens of its members; tokens[(size,
    feature)] -> list of tokens)."""
    fam = np.asarray(cols["family"])
    size, feat = np.asarray(cols["size"]), np.asarray(cols["feature"])
    n_fam = int(fam.max()) + 1 if len(fam) else 0
    order = np.lexsort((feat, size, fam))
    order = order[fam[order] >= 0]
    bounds = np.searchsorted(fam[order], np.arange(n_fam + 1))
    out = []
    for f in range(n_fam):
        idx = order[bounds[f]:bounds[f + 1]]
        members = [[int(size[i]), int(feat[i])] for i in idx]
        counts = Counter(t for m in members for t in tokens.get(tuple(m), [])[:3])
        out.append({"id": f, "members": members,
                    "sizes": sorted({m[0] for m in members}),
                    "per_size": dict(Counter(str(m[0]) for m in members)),
                    "tokens": [t for t, _ in counts.most_common(5)]})
    return out


def member_tokens(trials: list[dict]) -> tuple[dict, dict]:
    """(size, feature) -> top activating tokens, and size -> (features rows, examples,
    summary): pages.read_tables of every analysed trial (absent for one without an
    analysis), read once here for the family pages and the feature browser."""
    tokens, tables = {}, {}
    for s, t in enumerate(trials):
        if not store.exists(store.join(t["analysis"], "features.parquet")):
            continue
        tables[s] = pages.read_tables(t["analysis"])
        rows, examples, _ = tables[s]
        for r in rows:
            tokens[(s, r["feature"])] = pages.top_tokens(examples["features"][r["feature"]]["top"])
    return tokens, tables


def check(cfg: Config) -> tuple[list[dict], list]:
    """The stage's input check, cheap and without Ray: one finished trial per size, their
    SAEs of one width, the activation shards of that width. -> (trials, SAEs) for `run`."""
    trials = choose_trials(cfg)
    saes = [load_sae(t["sae_dir"])[0] for t in trials]
    widths = {m.d_in for m in saes}
    if len(widths) != 1:
        raise UserError(f"the trials' SAEs read different widths {sorted(widths)}: "
                        f"{[t['name'] for t in trials]}")
    shards = reader.shard_list(cfg.out)
    if shards["H"] != saes[0].d_in:
        raise UserError(f"the SAEs read {saes[0].d_in}-wide activations but the shards of "
                        f"{store.Layout(cfg.out).acts} hold H={shards['H']}")
    return trials, saes


@threads.pinned()  # its driver computes too: every core, not the job's 1 CPU
def run(cfg: Config) -> dict:
    """The stage (module doc) -> summary.json's dict (+ "index": the families index)."""
    t0 = time.perf_counter()
    trials, saes = check(cfg)
    logger.info("splitting: sizes %s (%s)", [t["n_features"] for t in trials],
                ", ".join(t["name"] for t in trials))
    ensure_analyses(cfg, trials)
    t1 = time.perf_counter()
    result = match(cfg, saes)
    cols, sizes = result["columns"], [t["n_features"] for t in trials]
    tokens, tables = member_tokens(trials)
    fams = families_json(cols, tokens)
    root = store.Layout(cfg.out).splitting
    store.write_table_atomic(store.join(root, "matches.parquet"), matches_table(cols))
    store.write_json(store.join(root, "families.json"), {"families": fams})
    summary = {"trials": trials, "threshold": cfg.splitting.threshold,
               "candidates": cfg.splitting.candidates, "map_method": cfg.splitting.map_method,
               "sample_rows": result["sample_rows"],
               "sizes": size_summary(sizes, cols),
               "families": len(fams),
               "largest_families": [{k: f[k] for k in ("id", "per_size", "tokens")}
                                    for f in fams[:10]],
               "seconds": {"analyses": t1 - t0, **result["seconds"]}}
    t2 = time.perf_counter()
    summary["index"] = family_pages.write(root, cols, fams, summary, tables, tokens,
                                          cfg.splitting.map_points, cfg.seed)
    summary["seconds"]["pages"] = time.perf_counter() - t2
    summary["seconds"]["total"] = time.perf_counter() - t0
    store.write_json(store.join(root, "summary.json"), summary)
    logger.info("splitting: %d families; %s in %.1f s", len(fams), summary["index"],
                summary["seconds"]["total"])
    return summary
