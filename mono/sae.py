"""Stage 4: the sparse autoencoder of Towards Monosemanticity, its loss and its training step.

Reads and writes nothing itself: `train_sae` feeds it batches of MLP activations, saves
`SparseAutoencoder.state_dict()` (SAELens layout: W_enc (H, F), W_dec (F, H), b_enc (F,),
b_dec (H,)) and checkpoints `Trainer.state_dict()` (Adam moments, per-feature step counts,
the fired mask) next to it.

Shapes: N tokens in a batch, H input width (d_mlp), F features (n_features).

One training step, two implementations of the same maths:
- `reference_step`: autograd + torch.optim.Adam, written as the paper states it;
- `Trainer.step`: a hand-written backward into preallocated buffers and `FeatureAdam`, an
  Adam that keeps one step counter per feature so resampling can restart a feature's bias
  correction. After the encoder GEMM the backward takes one of two paths, per batch by the
  density of f (`Trainer(path="auto")`; "dense"/"sparse" force one):
  - dense: 4 more GEMMs (decode, dW_dec, df, dW_enc), no autograd graph, no per-step
    allocation of (N, F) tensors: 10·H·F FLOPs per sample whatever the sparsity;
  - sparse (CPU only), while at most SPARSE_MAX_DENSITY of f is active: only f's nnz active
    entries are touched after the encoder (2·H·F + ~8·H·nnz/N FLOPs per sample): decode
    by embedding_bag over W_dec's rows, dloss/dpre at the active entries by sampled_addmm,
    dW_dec = f^T e and dW_enc = xc^T g as one embedding_bag each over the rows of e and xc,
    one bag per feature. No approximation: only the summation order differs.
    Early in training (f ~50% active) and off the CPU the dense path runs.
Tests hold the paths and reference_step equal; bench/sae.py times them side by side.

Limits: float32 (float64 for tests); no bf16/autocast path yet; the sparse path is CPU-only
(on CUDA "auto" and "sparse" run dense: the crossover there is unmeasured and the chunked
nonzero() scan would sync the host each chunk). Measured 2026-11-27 on the shared 2-core
AMD EPYC build box, 2 threads, N 8192, H 512, F 4096, best of rounds (other processes' load
swung absolute times up to 2-4x; the rankings held in every run), ms at 0.25 / 1 / 2.5 / 5%
of f active:
    encoder GEMM (dense, any density)                  ~240
    extract f's entries: flat nonzero + take           33 / 53 / 68 / 82  (to_sparse_csr 73 / 77)
    decode: embedding_bag                               4 / 11 / 31 / 63
            sparse.mm(CSR, W_dec)                      25 / 29 / 60 / 149
    df at active entries: sampled_addmm                 5 / 17 / 47 / 92
            gather + dot in row chunks                400 / 2600
    dW: CSC embedding_bag                               7 / 17 / 44 / 145
            sparse.mm(CSR^T, e)                        17 / 41 / 99 / 953
            CSR.t() @ e 32 / 326;  index_add_ in chunks 254 / 963
The whole step, sparse / dense time: 0.26 at 0.5% active, 0.36 at 2.5%, 0.55-0.87 at 5%,
1.05-1.13 at 10% (loaded box): crossover ~8%, SPARSE_MAX_DENSITY = 5% keeps a margin.
bench/sae.py (2026-11-27, 2 CPU threads, quiet, fp32 matmul peak measured alongside 114
GFLOP/s): dense step 4.5 k samples/s (0.49 of peak on DESIGN.md's 6·H·F, 0.82 on its real
10·H·F), 1.6x the autograd step; the sparse path at a trained-like L0 of 20 / 100 features
per token 14.6 / 13.9 k samples/s = 1.60 / 1.53 of peak @6HF, 3.5 / 3.3x the dense path.
On an H100 (dense path only): 1.86 M samples/s, 0.76 of its fp32 peak, 1.2x autograd.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.functional import embedding_bag

logger = logging.getLogger(__name__)


class SaeOutput(NamedTuple):
    """What `SparseAutoencoder.forward` returns."""

    x_hat: Tensor
    """(N, H) reconstruction."""
    f: Tensor
    """(N, F) feature activations (>= 0)."""
    loss: Tensor
    """() mse + l1_coeff * l1."""
    mse: Tensor
    """() mean over the N*H elements of (x_hat - x)^2."""
    l1: Tensor
    """() mean over the N examples of sum_F |f|."""


class SparseAutoencoder(nn.Module):
    """Towards Monosemanticity's SAE (Bricken et al. 2023), one hidden ReLU layer, untied.

        x_bar = x - b_dec                      (N, H)  the decoder bias is also the input centre
        f     = ReLU(x_bar W_enc + b_enc)      (N, F)
        x_hat = f W_dec + b_dec                (N, H)  rows of W_dec: the dictionary, unit norm
        loss  = mean_{N,H} (x_hat - x)^2  +  l1_coeff * mean_N sum_F |f|

    Normalisation (DESIGN.md): the MSE is a mean over elements, the L1 a per-example sum
    averaged over the batch, so the loss is the batch mean of `per_example_loss`. On this
    scale the paper's lambda is 0.004 and the seed's post-fix value 1e-3. The seed's famous
    3e-7 summed the L1 over the batch without dividing by it: at batch 8192 that is
    8192 * 3e-7 ~ 2.5e-3 here.

    Init: W_dec rows are random unit directions, W_enc = (2H/F) W_dec.T (then untied),
    b_enc = 0, b_dec = 0 until `init_b_dec_` sets the geometric median of a sample (paper;
    the seed kept PyTorch's Linear init and skipped the median). The transposed encoder
    starts every feature as a detector of its own dictionary direction (as in Anthropic's
    April 2024 update and sparsify) instead of an unrelated one. The factor 2H/F makes the
    initial reconstruction unbiased: for a random unit w, E[ReLU(x.w) w] = x / 2H, so F such
    terms give F/2H x. On tests/test_sae.py's ground-truth problem it lifted the mean
    best cosine to the true features from 0.95 to 0.997 at equal steps.
    """

    def __init__(self, d_in: int, n_features: int, l1_coeff: float, *,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 generator: torch.Generator | None = None):
        super().__init__()
        if d_in <= 0 or n_features <= 0:
            raise ValueError(f"SAE sizes must be positive, got d_in={d_in} n_features={n_features}")
        if not (l1_coeff >= 0 and math.isfinite(l1_coeff)):
            raise ValueError(f"l1_coeff must be a finite number >= 0, got {l1_coeff!r}")
        self.d_in, self.n_features, self.l1_coeff = d_in, n_features, float(l1_coeff)
        # Drawn on the CPU with the caller's generator: the same seed gives the same weights
        # on every device.
        w = torch.randn(n_features, d_in, generator=generator, dtype=torch.float64)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w.to(device=device, dtype=dtype))                   # (F, H)
        enc = w.T * (2 * d_in / n_features)                                             # (H, F)
        self.W_enc = nn.Parameter(enc.contiguous().to(device=device, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(n_features, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_in, device=device, dtype=dtype))

    def encode(self, x: Tensor) -> Tensor:
        """x: (N, H) -> f: (N, F)."""
        x = x.to(self.W_enc.dtype)
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)    # (N, F)

    def decode(self, f: Tensor) -> Tensor:
        """f: (N, F) -> x_hat: (N, H)."""
        return f @ self.W_dec + self.b_dec                                 # (N, H)

    def forward(self, x: Tensor) -> SaeOutput:
        """x: (N, H) activations (any float dtype) -> SaeOutput on the training normalisation."""
        x = x.to(self.W_enc.dtype)
        f = self.encode(x)
        x_hat = self.decode(f)
        mse = (x_hat - x).pow(2).mean()
        l1 = f.abs().sum(dim=-1).mean()
        return SaeOutput(x_hat, f, mse + self.l1_coeff * l1, mse, l1)

    def per_example_loss(self, x: Tensor) -> Tensor:
        """x: (N, H) -> (N,) mean_H (x_hat - x)^2 + l1_coeff * sum_F f (batch mean: the loss)."""
        x = x.to(self.W_enc.dtype)
        f = self.encode(x)
        return (self.decode(f) - x).pow(2).mean(dim=-1) + self.l1_coeff * f.sum(dim=-1)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Scale every dictionary vector (row of W_dec) to unit L2 norm, in place."""
        self.W_dec.div_(torch.linalg.vector_norm(self.W_dec, dim=1, keepdim=True))

    @torch.no_grad()
    def init_b_dec_(self, sample: Tensor) -> Tensor:
        """Set b_dec to the geometric median of `sample` (M, H) (paper); returns it."""
        if sample.ndim != 2 or sample.shape[1] != self.d_in or len(sample) == 0:
            raise ValueError(f"geometric-median sample must be (M, {self.d_in}), got "
                             f"{tuple(sample.shape)}")
        median = geometric_median(sample.to(self.b_dec.device))
        self.b_dec.copy_(median)
        return self.b_dec


@torch.no_grad()
def geometric_median(points: Tensor, max_iter: int = 500, tol: float = 1e-7) -> Tensor:
    """The point minimising sum_i |points_i - y|: points (M, H) -> (H,), in points' dtype.

    Weiszfeld's iteration y <- sum_i w_i x_i / sum_i w_i with w_i = 1/|x_i - y|, started at the
    mean, in float64, with the Vardi-Zhang (2000) rule for an iterate that lands on data
    points (where plain Weiszfeld divides by zero): with eta points at y and
    R = sum_{x_i != y} w_i (x_i - y), y is optimal if |R| <= eta, else step to
    (1 - eta/|R|) T + (eta/|R|) y. Stops when a step moves less than tol x the mean distance.
    """
    x = points.double()                                                    # (M, H)
    y = x.mean(dim=0)                                                      # (H,)
    scale = torch.linalg.vector_norm(x - y, dim=1).mean().item()
    if scale == 0.0:                                                       # all points equal
        return y.to(points.dtype)
    for _ in range(max_iter):
        d = torch.linalg.vector_norm(x - y, dim=1)                         # (M,)
        at_y = d <= 1e-12 * scale
        w = torch.where(at_y, 0.0, 1.0 / d.clamp_min(1e-300))              # (M,)
        w_sum = w.sum()
        t = (w @ x) / w_sum                                                # (H,) Weiszfeld step
        eta = int(at_y.sum())
        if eta:
            r = (w_sum * torch.linalg.vector_norm(t - y)).item()           # |R(y)|
            if r <= eta:
                return y.to(points.dtype)
            t = (1 - eta / r) * t + (eta / r) * y
        moved = torch.linalg.vector_norm(t - y).item()
        y = t
        if moved <= tol * scale:
            break
    else:
        logger.warning("geometric median: no convergence in %d iterations (last step %.3g)",
                       max_iter, moved / scale)
    return y.to(points.dtype)


@torch.no_grad()
def project_decoder_grad_(grad: Tensor, W_dec: Tensor) -> Tensor:
    """Remove from each row of grad (F, H) its component along that row of W_dec, in place.

    g <- g - (g . w) w / |w|^2: to first order the step then keeps |w| (paper: "remove the
    gradient information parallel to the dictionary vectors before each step").
    """
    coef = torch.linalg.vecdot(grad, W_dec) / torch.linalg.vecdot(W_dec, W_dec)   # (F,)
    return grad.addcmul_(W_dec, coef[:, None], value=-1)


def reference_step(sae: SparseAutoencoder, opt: torch.optim.Optimizer, x: Tensor) -> SaeOutput:
    """One training step written plainly: autograd, projection, Adam, renormalisation.

    The readable definition `Trainer.step` must match (tests) and the unfused baseline the
    benchmark compares it to. `opt` is any torch optimizer over `sae.parameters()`.
    """
    out = sae(x)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    project_decoder_grad_(sae.W_dec.grad, sae.W_dec)
    opt.step()
    sae.normalize_decoder_()    # every step (the seed did it every 1000)
    return out


class FeatureAdam:
    """Adam (Kingma & Ba; torch.optim.Adam's arithmetic) with one step counter per feature.

    torch.optim.Adam keeps one `step` per tensor, so zeroing a resampled row's moments leaves
    its bias correction at step ~25k: the next updates are 3-6x lr for ~100 steps
    (seed_spec §5). Here W_enc's columns, W_dec's rows and b_enc's entries share the
    counter `feature_step` (F,); b_dec has its own. `reset_features_` zeroes moments and
    counters of chosen features, whose next update is then exactly a fresh Adam's first.
    """

    def __init__(self, sae: SparseAutoencoder, lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be positive, got {lr!r}")
        self.lr, self.betas, self.eps = float(lr), betas, eps
        self.params = {n: p for n, p in sae.named_parameters()}
        dev = sae.W_enc.device
        self.exp_avg = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.exp_avg_sq = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self._scratch = {n: torch.empty_like(p) for n, p in self.params.items()}
        self.feature_step = torch.zeros(sae.n_features, dtype=torch.int64, device=dev)   # (F,)
        self.b_dec_step = torch.zeros((), dtype=torch.int64, device=dev)
        # each parameter's step counts, as views that broadcast against it (updated in place)
        self._steps = {"W_enc": self.feature_step[None, :], "W_dec": self.feature_step[:, None],
                       "b_enc": self.feature_step, "b_dec": self.b_dec_step}

    @torch.no_grad()
    def step(self, grads: dict[str, Tensor]) -> None:
        """Apply one Adam update from `grads` (name -> tensor shaped like the parameter)."""
        beta1, beta2 = self.betas
        self.feature_step += 1
        self.b_dec_step += 1
        for name, p in self.params.items():
            g, m, v = grads[name], self.exp_avg[name], self.exp_avg_sq[name]
            buf = self._scratch[name]
            # Adam: p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps), bc_i = 1 - beta_i^t per
            # feature; folded as p -= m / (sqrt(v) * a + c) to save passes over the tensor.
            t = self._steps[name].double()
            step_size = self.lr / (1 - beta1**t)
            a = (1 / (step_size * (1 - beta2**t).sqrt())).to(p.dtype)
            c = (self.eps / step_size).to(p.dtype)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            torch.addcmul(c, torch.sqrt(v, out=buf), a, out=buf)
            p.addcdiv_(m, buf, value=-1)

    @torch.no_grad()
    def reset_features_(self, idx: Tensor) -> None:
        """Forget the moments and step counts of features `idx` (K,) (after resampling)."""
        self.feature_step[idx] = 0
        for name in ("W_enc", "W_dec", "b_enc"):
            for state in (self.exp_avg[name], self.exp_avg_sq[name]):
                if name == "W_enc":
                    state[:, idx] = 0
                else:
                    state[idx] = 0

    def state_dict(self) -> dict[str, Tensor]:
        out = {"feature_step": self.feature_step, "b_dec_step": self.b_dec_step}
        for n in self.params:
            out[f"exp_avg.{n}"], out[f"exp_avg_sq.{n}"] = self.exp_avg[n], self.exp_avg_sq[n]
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for key, dst in self.state_dict().items():
            if key not in state or state[key].shape != dst.shape:
                got = tuple(state[key].shape) if key in state else "missing"
                raise ValueError(f"optimizer state {key!r}: expected {tuple(dst.shape)}, got {got}")
            dst.copy_(state[key])


class StepStats(NamedTuple):
    """Per-step numbers as 0-dim tensors on the SAE's device: `float()` them only when logging
    (on a GPU each float() waits for the step)."""

    loss: Tensor
    mse: Tensor
    l1: Tensor
    l0: Tensor
    """Mean number of active features per example."""


PATHS = ("auto", "dense", "sparse")
SPARSE_MAX_DENSITY = 0.05
"""`Trainer(path="auto")` takes the sparse backward when at most this fraction of f is
active (measured crossover on CPU; module docstring)."""
_SCAN_PROBE, _SCAN_CHUNK = 1 << 18, 1 << 22
"""Elements of f in the first nonzero() scan and in each later one (64 and 1024 rows at
F 4096). Few large scans: under load each small OpenMP call costs milliseconds (2^16-element
chunks made the 1% scan 20x slower); the probe bounds what a dense batch wastes."""


class Trainer:
    """Trains a SparseAutoencoder in place: `stats = trainer.step(x)` per batch.

    Each step: forward, hand-written backward, remove each dictionary vector's parallel
    gradient, FeatureAdam update, renormalise W_dec rows (every step). `fire_counts` (F,)
    counts the examples each feature was active on since `reset_fired()` (densities over
    the training window), and `fired` = fire_counts > 0 is the dead-feature detector for
    resampling (train_sae resets it `dead_window` steps before each resample). Buffers for
    one batch size are kept, so steady-state dense steps allocate only O(F + H) small
    tensors; sparse steps add O(nnz) index tensors and two (F, H) embedding_bag outputs.
    """

    def __init__(self, sae: SparseAutoencoder, lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, *,
                 path: str = "auto"):
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        self.sae = sae
        self.opt = FeatureAdam(sae, lr, betas, eps)
        self.grads = {n: torch.zeros_like(p) for n, p in sae.named_parameters()}
        # examples on which each feature was active since reset_fired(); float64 is exact
        # far beyond a 12,500-step window of 8192 (1e8 < 2^53)
        self.fire_counts = torch.zeros(sae.n_features, dtype=torch.float64,
                                       device=sae.W_enc.device)                       # (F,)
        self.n_steps = 0
        self.path = path
        """"auto" (sparse when f's density <= SPARSE_MAX_DENSITY), "dense" or "sparse" (both
        sparse ones on the CPU only: dense elsewhere)."""
        self.last_path: str | None = None
        """The path the last `compute_grads` took: "dense" or "sparse"."""
        self._buf: dict[str, Tensor] = {}

    @property
    def fired(self) -> Tensor:
        """(F,) bool: features active on at least one example since `reset_fired()`."""
        return self.fire_counts > 0

    def reset_fired(self) -> None:
        self.fire_counts.zero_()

    def _buffers(self, n: int) -> dict[str, Tensor]:
        if self._buf.get("xc") is None or self._buf["xc"].shape[0] != n:
            p = self.sae.W_enc
            H, F = p.shape
            self._buf = {
                "xc": p.new_empty(n, H),        # x - b_dec
                "f": p.new_empty(n, F),         # pre-activations, then f
                "e": p.new_empty(n, H),         # x_hat, then x_hat - x, then dloss/dx_hat
                "g": p.new_empty(n, F),         # dloss/df, then dloss/dpre
                "l1_grad": p.new_empty(F),      # d(l1_coeff * l1)/df = l1_coeff / N
                "ones": p.new_ones(n),          # column sums as GEMVs: 2-3x faster than sum(0)
            }
        return self._buf

    @torch.no_grad()
    def compute_grads(self, x: Tensor) -> StepStats:
        """Loss gradients of batch x (N, H) into `self.grads` (no projection); the stats.

        Forward to f on both paths, then the dense or the sparse backward (`self.path`; the
        one taken is left in `self.last_path`).
        """
        sae = self.sae
        if x.ndim != 2 or x.shape[1] != sae.d_in:
            raise ValueError(f"batch must be (N, {sae.d_in}), got {tuple(x.shape)}")
        x = x.to(sae.W_enc.device, non_blocking=True)
        b = self._buffers(x.shape[0])
        b["l1_grad"].fill_(sae.l1_coeff / x.shape[0])  # (F,) cheap; follows l1_coeff changes
        torch.sub(x, sae.b_dec, out=b["xc"])
        torch.addmm(sae.b_enc, b["xc"], sae.W_enc, out=b["f"])                # (N, F)
        b["f"].relu_()
        active = self._active_entries(b["f"])
        path = "dense" if active is None else "sparse"
        if path != self.last_path:
            logger.debug("SAE step %d: %s backward", self.n_steps, path)
        self.last_path = path
        if active is None:
            return self._dense_backward(x, b)
        return self._sparse_backward(x, b, *active)

    def _active_entries(self, f: Tensor) -> tuple[Tensor, Tensor] | None:
        """The sparse path's input: (flat indices into f (nnz,), f there (nnz,)) in row-major
        order, or None for the dense path.

        CPU only: off the CPU "auto" and "sparse" both take the dense path (the sparse one
        is unmeasured there, and each scan chunk would sync the host). "auto" goes sparse
        while the running density stays <= SPARSE_MAX_DENSITY: f is scanned in chunks of
        rows, a small probe first, and the scan stops at the first chunk where the density
        so far exceeds it, so a dense batch (early training) wastes only the probe's scan.
        """
        if self.path == "dense" or f.device.type != "cpu":
            return None
        flat = f.view(-1)
        limit = math.inf if self.path == "sparse" else SPARSE_MAX_DENSITY
        parts, nnz, start, size = [], 0, 0, _SCAN_PROBE
        while start < flat.numel():
            end = min(start + size, flat.numel())
            idx = flat[start:end].nonzero().squeeze(1)
            nnz += idx.numel()
            if nnz > limit * end:
                return None
            parts.append(idx.add_(start))
            start, size = end, _SCAN_CHUNK
        idx = torch.cat(parts)
        return idx, flat[idx]

    def _dense_backward(self, x: Tensor, b: dict[str, Tensor]) -> StepStats:
        """Decode and backward as 3 more GEMMs over the dense f (b["f"], after the ReLU)."""
        sae, gr = self.sae, self.grads
        xc, f, e, g, ones = b["xc"], b["f"], b["e"], b["g"], b["ones"]
        n, h = x.shape
        torch.addmm(sae.b_dec, f, sae.W_dec, out=e)                       # (N, H) x_hat
        e.sub_(x)
        # active counts through sign() into g, free until the backward: count_nonzero and
        # bool reductions are 5-10x slower on CPU
        counts = torch.mv(torch.sign(f, out=g).T, ones)                   # (F,)
        self.fire_counts += counts
        mse = torch.dot(e.view(-1), e.view(-1)) / (n * h)
        l1 = torch.mv(f.T, ones).sum() / n
        l0 = counts.sum() / n
        # backward: dloss/dx_hat = 2 (x_hat - x) / (N H)
        e.mul_(2.0 / (n * h))
        torch.mm(f.T, e, out=gr["W_dec"])                                  # (F, H)
        torch.addmm(b["l1_grad"], e, sae.W_dec.T, out=g)                   # (N, F) dloss/df
        # ReLU's own backward kernel (zero where f <= 0): one pass, no boolean temporary
        torch.ops.aten.threshold_backward.grad_input(g, f, 0, grad_input=g)
        torch.mm(xc.T, g, out=gr["W_enc"])                                 # (H, F)
        torch.mv(g.T, ones, out=gr["b_enc"])                               # (F,)
        self._b_dec_grad(e)
        return StepStats(mse + sae.l1_coeff * l1, mse, l1, l0)

    def _sparse_backward(self, x: Tensor, b: dict[str, Tensor], idx: Tensor,
                         vals: Tensor) -> StepStats:
        """Decode and backward touching only f's nnz active entries (flat `idx`, values
        `vals`): the dense path's maths, summed in another order.

        Each example's entries (CSR order, as scanned) decode through embedding_bag over
        W_dec's rows; dloss/dpre at the same entries is a sampled product (sampled_addmm);
        the same entries sorted by feature (CSC) make dW_dec and dW_enc one embedding_bag
        each over the rows of e and xc, one bag per feature.
        """
        sae, gr = self.sae, self.grads
        xc, e = b["xc"], b["e"]
        n, h = x.shape
        n_feat = sae.n_features
        rows = idx.div(n_feat, rounding_mode="floor")
        cols = idx - rows * n_feat
        crow = idx.new_zeros(n + 1)                                        # CSR row pointers
        torch.cumsum(torch.bincount(rows, minlength=n), 0, out=crow[1:])
        x_hat = embedding_bag(cols, sae.W_dec, crow[:-1], mode="sum", per_sample_weights=vals)
        torch.sub(x_hat, x, out=e).add_(sae.b_dec)                         # (N, H) x_hat - x
        counts = torch.bincount(cols, minlength=n_feat)                    # (F,) active examples
        self.fire_counts += counts
        mse = torch.dot(e.view(-1), e.view(-1)) / (n * h)
        l1 = vals.sum() / n
        l0 = vals.new_tensor(idx.numel() / n)
        e.mul_(2.0 / (n * h))
        # dloss/dpre on the active entries (the ReLU passes them, |f|' = 1 there):
        # l1_coeff / N + e[b] . W_dec[j]
        with warnings.catch_warnings():    # torch flags every CSR tensor as "beta"
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
            pattern = torch.sparse_csr_tensor(crow, cols, vals.new_full(vals.shape,
                                              sae.l1_coeff / n), (n, n_feat),
                                              check_invariants=False)
        g_vals = torch.sparse.sampled_addmm(pattern, e, sae.W_dec.T).values()        # (nnz,)
        # CSC order: a stable sort keeps each feature's examples ascending (deterministic)
        perm = torch.argsort(cols, stable=True)
        rows_c = rows[perm]
        starts = torch.cumsum(counts, 0).sub_(counts)                     # (F,) bag offsets
        gr["W_dec"].copy_(embedding_bag(rows_c, e, starts, mode="sum",
                                        per_sample_weights=vals[perm]))   # (F, H) f^T e
        gr["W_enc"].copy_(embedding_bag(rows_c, xc, starts, mode="sum",
                                        per_sample_weights=g_vals[perm]).T)  # (H, F) xc^T g
        gr["b_enc"].zero_().index_add_(0, cols, g_vals)                   # (F,)
        self._b_dec_grad(e)
        return StepStats(mse + sae.l1_coeff * l1, mse, l1, l0)

    def _b_dec_grad(self, e: Tensor) -> None:
        """b_dec's gradient from dloss/dx_hat e (N, H) and b_enc's (already in self.grads)."""
        gr = self.grads
        # b_dec enters twice: + through x_hat, - through x_bar = x - b_dec
        torch.sum(e, dim=0, out=gr["b_dec"])                               # (H,)
        gr["b_dec"].addmv_(self.sae.W_enc, gr["b_enc"], alpha=-1)

    @torch.no_grad()
    def step(self, x: Tensor) -> StepStats:
        """One training step on batch x (N, H) (any float dtype, any device); stats of the
        batch before the update."""
        stats = self.compute_grads(x)
        self.apply_grads()
        return stats

    def apply_grads(self) -> None:
        """The update from self.grads (as `compute_grads` leaves them): remove each decoder
        row's parallel gradient component, Adam, renormalise W_dec rows (paper: every step)."""
        project_decoder_grad_(self.grads["W_dec"], self.sae.W_dec)
        self.opt.step(self.grads)
        self.sae.normalize_decoder_()
        self.n_steps += 1

    def state_dict(self) -> dict[str, Tensor]:
        """Everything but the weights a resume needs: flat name -> tensor (safetensors-ready)."""
        state = {f"adam.{k}": v for k, v in self.opt.state_dict().items()}
        state["fire_counts"] = self.fire_counts
        state["n_steps"] = torch.tensor(self.n_steps, dtype=torch.int64)
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Inverse of `state_dict` (load the SAE's weights separately, before or after)."""
        prefix = "adam."
        self.opt.load_state_dict({k[len(prefix):]: v for k, v in state.items()
                                  if k.startswith(prefix)})
        counts = state.get("fire_counts")
        if counts is None or counts.shape != self.fire_counts.shape:
            got = "missing" if counts is None else tuple(counts.shape)
            raise ValueError(f"trainer state fire_counts: expected "
                             f"{tuple(self.fire_counts.shape)}, got {got}")
        self.fire_counts.copy_(state["fire_counts"])
        self.n_steps = int(state["n_steps"])
