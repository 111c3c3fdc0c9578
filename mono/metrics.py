"""Stage 4: the SAE eval: a fixed held-out set through the LM, the SAE spliced in; metrics.

Reads <out>/tokens/val (the eval contexts), <out>/lm (the LM the eval splices the SAE into;
the caller loads it) and the activation mean: `acts_mean`, the training rows' mean
activation, computed from <out>/acts (manifest + Parquet shards) once per activation dataset
and cached in <out>/acts/mean.json (the one file this module writes besides the density
histogram PNG, `density_histogram`, at a path the caller names). mono.train_sae runs the
eval every `eval_interval` steps and at the end; mono.pack shares one `EvalSet` in a pack.

The set (`EvalSet`): `eval_contexts` contexts of the val token split drawn without
replacement by a generator seeded by the run's seed alone (`eval_contexts()`: the same for
every trial of a sweep, not the corpus's first documents), every one of their T positions.
One LM pass caches the residual entering the MLP and the MLP activations (float32 on the
device: eval_contexts x T x (D + H) x 4 bytes, 168 MB for the paper preset); each eval
encodes them and finishes the LM forward from x_hat, under inference_mode (no autograd
graphs). The baselines do not change, so they are computed once (the training run keeps them
in its checkpoint). Next-token targets as in train_lm: a context's last target is the first
token of the next context of the val stream (-1 if not held).

Metrics (`EvalSet.evaluate`, one flat JSON-ready dict): l0 (mean active features per token),
mse (mean over elements, the training normalisation), l1 (mean over tokens of sum_F f), loss
(mse + l1_coeff * l1), explained_variance (1 - sum |x - x_hat|^2 / sum |x - mean x|^2); mean
next-token cross-entropies in nats with the MLP activation as is (L_orig), zeroed (L_zero),
replaced by its mean over training rows (L_mean, `acts_mean`), by b_dec alone (L_bdec: every
feature silent) and by x_hat (L_sae); loss_recovered_mean = (L_mean - L_sae) / (L_mean -
L_orig), the sweep's HEADLINE; loss_recovered = (L_zero - L_sae) / (L_zero - L_orig), the
paper's definition (79% at A/1), kept for comparison: this bias-free LM's MLP output carries
a large input-independent part that b_dec reproduces, so against zero ablation an SAE with
every feature silent already "recovers" ~1 (tiny run: 1.03); nll_score = 1 - loss_recovered
(the seed's logged name: lower is better; its code comment says the inverse); ce_increase =
L_sae - L_orig; kl = mean over eval tokens of KL(original || spliced) next-token
distributions (nats), exact from the spliced logits' logsumexp and a per-token summary of the
original distribution computed once (`EvalSet._reference`), so an eval costs two unembedding
passes (L_sae + kl, L_bdec). Densities on the eval tokens (secondary; the training-stream
ones are mono.train_sae's): dead / ultralow / dense _eval (mono.density's counts over the
eval-token densities), eval_tokens: resolution 1 / eval tokens, so ultralow_eval is 0 by
construction below 1e5 tokens.

Limits: float32 only; the eval holds its cache on the given device.
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from mono import store
from mono.config import Config
from mono.density import DENSE
from mono.density import counts as density_counts
from mono.errors import UserError
from mono.lm import Lm
from mono.reader import ActsReader
from mono.sae import SparseAutoencoder

logger = logging.getLogger(__name__)

# Domain tag for np.random.default_rng([seed, tag]); mono.train_sae uses 11 and 12.
_EVAL = 13
EVAL_CHUNK_ELEMENTS = 2**25
"""Largest (tokens x F) block of feature activations one eval chunk holds (128 MB fp32)."""
LOGIT_CHUNK_TOKENS = 1024
"""Tokens whose (tokens, V) logits the CE and KL compute at once (206 MB at V 50304)."""


def eval_contexts(seed: int, n_val: int, n: int) -> np.ndarray:
    """The eval set's val context ids: n of n_val drawn without replacement by a generator
    seeded by the run's seed alone (so every trial of a sweep gets the same), sorted."""
    rng = np.random.default_rng([seed, _EVAL])
    return np.sort(rng.choice(n_val, size=n, replace=False)).astype(np.int64)


def acts_mean(cfg: Config, inputs: dict) -> np.ndarray:
    """(H,) float64 mean MLP activation over the first sae.mean_rows rows (0 = all) of the
    training stream (seeded as training), for the mean-ablation baseline L_mean.

    Computed once per activation dataset and cached in <out>/acts/mean.json, keyed by what
    defines it (dataset, rows, seed, shuffle buffer): a sweep's driver computes it in
    check_inputs, its trials read it.
    """
    rows = min(cfg.sae.mean_rows or inputs["rows"], inputs["rows"])
    key = {"acts_sha256": inputs["acts_sha256"], "rows": rows, "seed": cfg.seed,
           "shuffle_buffer": cfg.sae.shuffle_buffer}
    path = store.Layout(cfg.out).acts_mean
    if store.exists(path):
        cached = store.read_json(path)
        if cached.get("key") == key:
            return np.asarray(cached["mean"], dtype=np.float64)
    t0 = time.perf_counter()
    total, n = torch.zeros(inputs["H"], dtype=torch.float64), 0
    reader = ActsReader(cfg.out, min(rows, 65_536), seed=cfg.seed, epochs=1, max_rows=rows,
                        shuffle_buffer=cfg.sae.shuffle_buffer, drop_last=False)
    for x in reader:                                                             # (n, H)
        total += x.double().sum(dim=0)
        n += len(x)
    if n != rows or not bool(torch.isfinite(total).all()):
        raise UserError(f"the mean over {n} of {rows} training rows of "
                        f"{store.Layout(cfg.out).acts} is not finite or incomplete: the "
                        f"activation shards are corrupt; recollect them")
    mean = (total / n).numpy()
    store.write_json(path, {"key": key, "mean": mean.tolist()})
    logger.info("SAE: mean activation over %d training rows in %.1f s -> %s", n,
                time.perf_counter() - t0, path)
    return mean


class EvalSet:
    """The fixed eval set: `eval_contexts` val contexts (`eval_contexts()`) through the LM.

    resid (B, T, D) and acts (B, T, H) as `Lm.mlp_site` gives them, targets (B, T) (-1 = no
    target: the last position of a context whose successor in the val stream is not held),
    var_total = sum |x - mean x|^2, and the cached baselines L_orig, L_zero, L_mean.
    """

    def __init__(self, cfg: Config, lm: Lm, device: torch.device, n_features: int):
        tm = store.tokens_manifest(cfg.out)
        n_val, T = tm["splits"]["val"]["rows"], tm["ctx_len"]
        n = min(cfg.sae.eval_contexts, n_val)
        if n < cfg.sae.eval_contexts:
            logger.warning("sae.eval_contexts=%d but the val split holds %d contexts: "
                           "evaluating on %d", cfg.sae.eval_contexts, n_val, n)
        self.ctx = eval_contexts(cfg.seed, n_val, n)                              # (B,)
        # row r's last target is the first token of the context after it in the val stream
        nxt = self.ctx + 1
        want = np.union1d(self.ctx, nxt[nxt < n_val])
        rows = store.read_context(cfg.out, want, "val")                           # (u, T)
        first = rows[np.searchsorted(want, np.minimum(nxt, want[-1])), 0]
        last = np.where(nxt < n_val, first, -1)                                   # (B,)
        idx = torch.from_numpy(rows[np.searchsorted(want, self.ctx)]).to(device)  # (B, T)
        targets = torch.cat([idx[:, 1:], torch.from_numpy(last).to(device)[:, None]], dim=1)
        self.lm, self.targets, self.T = lm, targets, T
        self.n_targets = int((targets != -1).sum())
        self.n_tokens = n * T
        # contexts per chunk: a (tokens, F) block of f within EVAL_CHUNK_ELEMENTS
        self.chunk = max(1, min(n, EVAL_CHUNK_ELEMENTS // (T * max(n_features, lm.cfg.d_mlp))))
        with torch.inference_mode():
            sites = [lm.mlp_site(idx[s:s + self.chunk]) for s in range(0, n, self.chunk)]
            self.resid = torch.cat([s.resid for s in sites]).float()              # (B, T, D)
            self.acts = torch.cat([s.acts for s in sites]).float()                # (B, T, H)
            x = self.acts.flatten(0, 1).double()                                  # (N, H)
            self.var_total = float((x - x.mean(dim=0)).pow(2).sum())
        self.baseline: dict[str, float] | None = None
        self._ref: tuple[Tensor, Tensor] | None = None

    def slices(self):
        return [slice(s, s + self.chunk) for s in range(0, len(self.acts), self.chunk)]

    @torch.inference_mode()
    def lm_loss(self, acts_fn: Callable[[Tensor], Tensor]) -> float:
        """Mean next-token loss with the MLP activation of each chunk replaced by
        acts_fn(original acts (b, T, H)) -> (b, T, H)."""
        total = 0.0
        for sl in self.slices():
            ce = self.lm.loss_from(self.resid[sl], acts_fn(self.acts[sl]), self.targets[sl],
                                   reduction="none")                               # (b, T)
            total += float(ce[self.targets[sl] != -1].double().sum())
        return total / self.n_targets

    def baselines(self, mean: np.ndarray) -> dict[str, float]:
        """L_orig, L_zero (MLP zero-ablated) and L_mean (MLP activation replaced by the
        training mean `mean` (H,)), unless already set (cached: they never change)."""
        if self.baseline is None:
            m = torch.as_tensor(mean, dtype=torch.float32, device=self.acts.device)
            self.baseline = {"L_orig": self.lm_loss(lambda a: a),
                             "L_zero": self.lm_loss(torch.zeros_like),
                             "L_mean": self.lm_loss(lambda a: m.expand_as(a))}
            b = self.baseline
            if not min(b["L_zero"], b["L_mean"]) > b["L_orig"]:
                logger.warning("ablating the MLP does not raise the eval loss (orig %.4f, zero "
                               "%.4f, mean %.4f): loss recovered is meaningless for this LM",
                               b["L_orig"], b["L_zero"], b["L_mean"])
        return self.baseline

    def _head(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Final residual x (n, D) -> (ln_f(x) (n, D), next-token logits (n, V) float32)."""
        h = self.lm.transformer.ln_f(x)
        return h, self.lm.lm_head(h).float()

    def _parts(self, sl: slice, acts: Tensor):
        """(token slice, final residual (c, D)) of chunk `sl` with the MLP activation acts
        (b, T, H), LOGIT_CHUNK_TOKENS tokens at a time (the (tokens, V) logits never exist
        whole)."""
        c_proj = self.lm.transformer.h[-1].mlp.c_proj
        x = (self.resid[sl] + c_proj(acts)).flatten(0, 1)                          # (n, D)
        for s in range(0, len(x), LOGIT_CHUNK_TOKENS):
            yield slice(s, s + LOGIT_CHUNK_TOKENS), x[s:s + LOGIT_CHUNK_TOKENS]

    def _reference(self) -> tuple[Tensor, Tensor]:
        """What the KL needs of the original forward, per token (computed once, not kept
        in checkpoints): pW = p @ W_U (B, T, D) and c = pW . ln_f(x) - logsumexp(z) (B, T),
        float64, where z = W_U ln_f(x) are the original logits and p = softmax(z).

        KL(p || q) = sum_v p_v (z_v - lse(z)) - sum_v p_v (z'_v - lse(z')) = c - pW . h' +
        lse(z') for spliced logits z' = W_U h': an eval then needs only the spliced
        logits' logsumexp, not the original (tokens, V) distribution again.
        """
        if self._ref is None:
            W_U, pws, cs = self.lm.lm_head.weight.float(), [], []                 # (V, D)
            for sl in self.slices():
                for _, x in self._parts(sl, self.acts[sl]):
                    h, z = self._head(x)                                           # (c, V)
                    lse = torch.logsumexp(z, dim=1)                                # (c,)
                    pw = (torch.softmax(z, dim=1) @ W_U).double()                  # (c, D)
                    pws.append(pw)
                    cs.append((pw * h.double()).sum(dim=1) - lse.double())
            B, T = self.targets.shape
            self._ref = torch.cat(pws).view(B, T, -1), torch.cat(cs).view(B, T)
        return self._ref

    def _ce_kl(self, sl: slice, x_hat: Tensor) -> tuple[float, float]:
        """Sums over chunk `sl` of the next-token loss with the MLP activation replaced by
        x_hat (b, T, H) and of KL(original || spliced) per token (`_reference`)."""
        pw_all, c_all = (r[sl].flatten(0, 1) for r in self._reference())          # (n, D), (n,)
        targets = self.targets[sl].flatten()                                       # (n,)
        ce = kl = 0.0
        for part, x in self._parts(sl, x_hat):
            h, z = self._head(x)                                                   # (c, V)
            lse = torch.logsumexp(z, dim=1)                                        # (c,)
            t = targets[part]
            ok = t != -1
            ce += float((lse[ok] - z[ok].gather(1, t[ok, None]).squeeze(1)).double().sum())
            kl += float((c_all[part] - (pw_all[part] * h.double()).sum(dim=1)
                         + lse.double()).sum())
        return ce, kl

    @torch.inference_mode()
    def evaluate(self, sae: SparseAutoencoder, mean: np.ndarray | None = None,
                 ultralow: float = 1e-5) -> tuple[dict, np.ndarray]:
        """SAE metrics on the eval set -> (metrics, eval-token densities (F,) float64).

        mean: the training mean (acts_mean) for L_mean; only needed while the baselines
        are not cached. ultralow: the eval-token ultralow cutoff.
        """
        if self.baseline is None:
            assert mean is not None, "evaluate needs the training mean for the baselines"
        base = self.baselines(mean)
        H, dev = self.acts.shape[-1], self.acts.device
        count = torch.zeros(sae.n_features, dtype=torch.float64, device=dev)     # (F,)
        sq = l1 = loss_sae = kl = 0.0
        for sl in self.slices():
            x = self.acts[sl].flatten(0, 1)                                        # (n, H)
            f = sae.encode(x)                                                      # (n, F)
            x_hat = sae.decode(f)                                                  # (n, H)
            sq += float((x_hat - x).double().pow(2).sum())
            l1 += float(f.double().sum())
            count += (f > 0).sum(dim=0)
            ce_sum, kl_sum = self._ce_kl(sl, x_hat.view(-1, self.T, H))
            loss_sae += ce_sum
            kl += kl_sum
        n = self.n_tokens
        density = (count / n).cpu().numpy()                                        # (F,)
        mse, l1 = sq / (n * H), l1 / n
        loss_sae /= self.n_targets
        # x_hat = b_dec: every feature silent (the part of the MLP output b_dec reproduces)
        loss_bdec = self.lm_loss(lambda a: sae.b_dec.expand_as(a))
        eval_counts = density_counts(density, ultralow)

        def recovered(ablated: float) -> float:
            gap = ablated - base["L_orig"]
            return (ablated - loss_sae) / gap if gap != 0 else float("nan")

        zero = recovered(base["L_zero"])
        metrics = {
            "l0": float(count.sum()) / n, "mse": mse,
            "explained_variance": 1 - sq / self.var_total if self.var_total else float("nan"),
            "l1": l1, "loss": mse + sae.l1_coeff * l1,
            **base, "L_bdec": loss_bdec, "L_sae": loss_sae,
            "loss_recovered_mean": recovered(base["L_mean"]),
            "loss_recovered": zero, "nll_score": 1 - zero,
            "ce_increase": loss_sae - base["L_orig"], "kl": kl / n,
            **{f"{k}_eval": v for k, v in eval_counts.items()}, "eval_tokens": n,
        }
        return metrics, density


def density_histogram(density: np.ndarray, path: str, title: str, n_rows: int,
                      ultralow: float) -> None:
    """PNG of log10(training-window density) over the features that fired; dead ones in the
    title; a dotted line at 1 / n_rows, the lowest density the window can see."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    alive = density[density > 0]
    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)  # Agg, no pyplot: no global state, no display needed
    ax = fig.add_subplot()
    if len(alive):
        ax.hist(np.log10(alive), bins="auto", color="tab:blue")
    for x, label, style in ((math.log10(ultralow), "ultralow", "--"),
                            (math.log10(DENSE), "dense", "--"),
                            (-math.log10(max(n_rows, 1)), "1 row", ":")):
        ax.axvline(x, color="grey", linestyle=style, linewidth=1)
        ax.text(x, 1, f" {label}", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
    ax.set_xlabel(f"log10 feature density (fraction of the last {n_rows:,} training rows "
                  f"with f > 0)")
    ax.set_ylabel("features")
    ax.set_title(f"{title}\n{len(density) - len(alive)} of {len(density)} features never "
                 f"fired on those rows (not shown)", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    store.write_bytes_atomic(path, buf.getvalue())
