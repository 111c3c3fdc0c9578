"""Stage 2: the one-layer transformer (nanoGPT, as the seed's `transformer/model.py`).

Reads and writes nothing itself: `mono.train_lm` trains it, `mono.store.save_lm`/`load_lm`
persist it, `mono.acts` calls `mlp_acts`, the SAE eval calls `mlp_site` + `loss_from`.

Architecture (seed `paper` preset, seed_spec.md §2): `n_layer` pre-LN blocks, d_model 128,
4 heads, d_mlp 512, exact (erf) GELU, no biases anywhere (Linear and LayerNorm), learned
positions, token embedding tied to the unembedding, vocab 50304, no dropout. Parameter
names follow nanoGPT (`transformer.h.0.mlp.c_fc.weight`, ...), so a nanoGPT/seed state
dict with bias=False loads as is.

The SAE reads the last block's MLP activation after the GELU and before `c_proj` (the
seed's `HookedGPT` hook on `mlp.gelu`). Nothing has a bias, so replacing that activation
by zeros removes the MLP's contribution exactly: the "MLP-ablated" loss.

Shapes: B sequences, T context, P sampled positions per sequence, D d_model, H d_mlp,
V vocab, N flattened tokens, nh heads, hd head width (D / nh).

Limits: no dropout, no generation (the pipeline never samples text), no KV cache. The eval
helpers (`mlp_acts`, `mlp_site`, `loss_from`, `loss_with_mlp_acts`) run under
`torch.no_grad()`; only `forward` builds a graph, for training.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mono.config import LmConfig

logger = logging.getLogger(__name__)

# Tokens per cross-entropy chunk in `loss_from`: (8192, 50304) float32 logits are 1.6 GB;
# chunking keeps the eval's peak memory at that regardless of the batch.
LOSS_CHUNK_TOKENS = 8192
# mlp_acts at sampled positions on CPU: sorted queries in up to ATTN_CHUNKS groups of at
# least ATTN_MIN_QUERIES, each attending over the key prefix it needs (bench/lm.py: 4 groups
# beat 1, 2 and 8 at 8 x 1024 tokens, 200 positions). On GPUs the masked attention at
# sampled rows lost to one causal flash-attention pass over the prefix (H100: 2.4 ms vs
# 0.8 ms per batch), so there only the MLP runs at the sampled rows.
ATTN_CHUNKS = 4
# Rows per chunk of the training loss (`linear_cross_entropy`): (128, 50304) float32 logits
# are 26 MB, L3-sized. Measured on 2 CPU threads, 512 tokens per step (2026-11-27, loaded
# box): 128 rows beat 16/32/64/512; the demo LM's whole step 1.4x, the tiny LM's 2.0x the
# unfused F.cross_entropy step, which is then bound by the three (512, 128) x (128, 50304)
# matmuls (bench/lm.py).
CE_CHUNK_ROWS = 128
ATTN_MIN_QUERIES = 32
SAMPLED_ATTENTION_DEVICES = ("cpu",)


def _min_max(t: Tensor) -> tuple[int, int]:
    """(min, max) of a non-empty integer tensor with one device sync; (0, 0) if empty."""
    return tuple(torch.stack([t.min(), t.max()]).tolist()) if t.numel() else (0, 0)


def _rows(positions: Tensor, x: Tensor) -> Tensor:
    """positions (B, P) -> a gather index (B, P, D) for rows of x (B, T, D)."""
    return positions[..., None].expand(-1, -1, x.shape[2])


class LmOutput(NamedTuple):
    logits: Tensor | None
    """(B, T, V) next-token logits; None when targets were given (the loss is then computed
    chunk by chunk and the logits never exist whole)."""
    loss: Tensor | None
    """Mean cross-entropy over the targets (None without targets)."""


class MlpSite(NamedTuple):
    """What the last MLP sees and produces; `loss_from` finishes the forward from here."""

    resid: Tensor
    """(B, T, D) residual stream entering the last block's MLP (after its attention)."""
    acts: Tensor
    """(B, T, H) MLP activation after the GELU, before c_proj: the SAE's input."""


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: LmConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def _heads(self, x: Tensor) -> Tensor:
        B, L, D = x.shape
        return x.view(B, L, self.n_head, D // self.n_head).transpose(1, 2)  # (B, nh, L, hd)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, D) normalised residual -> (B, T, D) attention output."""
        B, T, D = x.shape
        q, k, v = self.c_attn(x).split(D, dim=2)                      # 3 x (B, T, D)
        y = F.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v),
                                           is_causal=True)            # (B, nh, T, hd)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, D))        # (B, T, D)

    def at(self, x: Tensor, positions: Tensor, chunks: int = 1) -> Tensor:
        """Attention output at `positions` only.

        x: (B, T, D) normalised residual of the whole prefix, positions: (B, P) long, sorted
        along P -> (B, P, D). Keys and values are needed for every prefix token; queries,
        the attention and c_proj only at the P sampled rows, each query over keys 0..its
        position. With `chunks` > 1 the sorted queries go in that many groups, each against
        only the key prefix its last position needs: about half the attention work for
        positions spread uniformly over the context.
        """
        B, T, D = x.shape
        W_q, W_kv = self.c_attn.weight.split([D, 2 * D])              # (D, D), (2D, D)
        k, v = F.linear(x, W_kv).split(D, dim=2)                      # 2 x (B, T, D)
        k, v = self._heads(k), self._heads(v)                         # 2 x (B, nh, T, hd)
        x_p = x.gather(1, positions[..., None].expand(-1, -1, D))     # (B, P, D)
        q = self._heads(F.linear(x_p, W_q))                           # (B, nh, P, hd)
        ys = []
        for q_c, pos_c in zip(q.chunk(chunks, dim=2), positions.chunk(chunks, dim=1)):
            L = int(pos_c[:, -1].max()) + 1                           # keys this group needs
            mask = torch.arange(L, device=x.device) <= pos_c[..., None]  # (B, P_c, L)
            ys.append(F.scaled_dot_product_attention(q_c, k[:, :, :L], v[:, :, :L],
                                                     attn_mask=mask[:, None]))  # (B, nh, P_c, hd)
        y = torch.cat(ys, dim=2)                                      # (B, nh, P, hd)
        return self.c_proj(y.transpose(1, 2).reshape(B, -1, D))       # (B, P, D)


class Mlp(nn.Module):
    def __init__(self, cfg: LmConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.gelu = nn.GELU()  # exact erf form, as nanoGPT and the seed
        self.c_proj = nn.Linear(cfg.d_mlp, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.acts(x))

    def acts(self, x: Tensor) -> Tensor:
        """x: (..., D) normalised residual -> (..., H) post-GELU activation."""
        return self.gelu(self.c_fc(x))


class Block(nn.Module):
    def __init__(self, cfg: LmConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, bias=False)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, bias=False)
        self.mlp = Mlp(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _LinearCrossEntropy(torch.autograd.Function):
    """mean CE(h W^T, targets) with the gradients made in the forward, chunk by chunk.

    The unembedding dominates this model's step (V = 50304 against d_model 128): unfused,
    the (N, V) logits go to memory and back some eight times (matmul out, log-softmax and
    its backward, the NLL gradient's zero fill, two matmuls in backward). Here each chunk's
    logits are made, turned into (softmax - onehot) / n in place while cache-resident, and
    multiplied into grad_h and grad_W at once (as Liger-Kernel's fused linear cross-entropy
    does on GPUs). The gradients are saved and scaled by grad_output in backward.
    """

    @staticmethod
    def forward(ctx, h: Tensor, W: Tensor, targets: Tensor, chunk: int) -> Tensor:
        valid = targets != -1
        n = valid.sum().clamp(min=1)
        dtype = (torch.get_autocast_dtype(h.device.type)
                 if torch.is_autocast_enabled(h.device.type) else h.dtype)
        acc = torch.promote_types(dtype, torch.float32)  # softmax and grad_W at >= fp32
        with torch.autocast(h.device.type, enabled=False):
            hc, Wc = h.to(dtype), W.to(dtype)
            grad_h = torch.empty_like(hc)
            grad_W = torch.zeros(W.shape, dtype=acc, device=W.device)
            total = torch.zeros((), dtype=acc, device=h.device)
            for start in range(0, h.shape[0], chunk):
                hs, ts = hc[start:start + chunk], targets[start:start + chunk]
                vs = valid[start:start + chunk]
                logits = (hs @ Wc.T).to(acc)                          # (n, V)
                rows, tgt = torch.arange(len(ts), device=h.device), ts.clamp(min=0)
                w = vs.to(acc) / n                                    # 1/n, 0 if ignored
                picked = logits[rows, tgt]
                top = logits.amax(dim=1, keepdim=True)
                probs = logits.sub_(top).exp_()                       # in place, one exp
                norm = probs.sum(dim=1, keepdim=True)
                total += ((norm.log() + top).squeeze(1).sub_(picked) * vs).sum()
                probs.mul_(w[:, None] / norm)                         # softmax / n
                probs[rows, tgt] -= w                                 # - onehot / n
                g = probs.to(dtype)
                grad_h[start:start + chunk] = g @ Wc
                grad_W.addmm_(probs.T, hs.to(acc))
        ctx.save_for_backward(grad_h.to(h.dtype), grad_W.to(W.dtype))
        return total / n.to(acc)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_W = ctx.saved_tensors
        return grad_h * grad_out, grad_W * grad_out, None, None


def linear_cross_entropy(h: Tensor, W: Tensor, targets: Tensor,
                         chunk: int = CE_CHUNK_ROWS) -> Tensor:
    """Mean cross-entropy of logits h W^T (h (N, D), W (V, D)) against targets (N,), -1 =
    ignore; equal to `F.cross_entropy(h @ W.T, targets, ignore_index=-1)` without the (N, V)
    logits in memory (`_LinearCrossEntropy`). Only for training: it computes the gradient
    whether or not it is needed."""
    return _LinearCrossEntropy.apply(h, W, targets, chunk)


class Lm(nn.Module):
    """The seed's one-layer GPT: `forward` for training, `mlp_acts` for the SAE data."""

    def __init__(self, cfg: LmConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.d_model),
            wpe=nn.Embedding(cfg.block_size, cfg.d_model),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.d_model, bias=False),
        ))
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied embeddings (nanoGPT, seed)
        self.apply(self._init_weights)
        # GPT-2 / nanoGPT: residual projections scaled by 1/sqrt(2 * n_layer) (0.0141 at 1 layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters, counted once despite the tying; without the position embedding by
        default, as nanoGPT's `get_num_params` (the seed's ≈6.64 M)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    # --- the trunk, shared by every entry point ----------------------------------------

    def _check_idx(self, idx: Tensor) -> None:
        if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"idx must be a (B, T) int64/int32 tensor, got {tuple(idx.shape)} "
                             f"{idx.dtype}")
        if idx.shape[1] > self.cfg.block_size:
            raise ValueError(f"context of {idx.shape[1]} tokens is longer than the LM's "
                             f"block_size {self.cfg.block_size}")
        lo, hi = _min_max(idx)
        if lo < 0 or hi >= self.cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size}), got "
                             f"min {lo} max {hi}")

    def _embed(self, idx: Tensor) -> Tensor:
        """idx (B, T) -> (B, T, D) residual stream after the embeddings and every block but
        the last."""
        self._check_idx(idx)
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)     # (B, T, D)
        for block in self.transformer.h[:-1]:
            x = block(x)
        return x

    def _unembed_loss(self, x: Tensor, targets: Tensor, reduction: str) -> Tensor:
        """x (N, D) final residual, targets (N,) -> CE, computed in chunks of tokens."""
        losses = []
        for xs, ts in zip(x.split(LOSS_CHUNK_TOKENS), targets.split(LOSS_CHUNK_TOKENS)):
            logits = self.lm_head(self.transformer.ln_f(xs)).float()  # (n, V)
            losses.append(F.cross_entropy(logits, ts, ignore_index=-1, reduction="none"))
        loss = torch.cat(losses)                                      # (N,)
        return loss if reduction == "none" else loss[targets != -1].mean()

    # --- training ----------------------------------------------------------------------

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> LmOutput:
        """idx (B, T) token ids -> LmOutput with logits (B, T, V); with targets (B, T)
        (next ids, -1 = ignore) instead the mean cross-entropy and no logits, through the
        chunked `linear_cross_entropy` (the training step)."""
        x = self.transformer.ln_f(self.transformer.h[-1](self._embed(idx)))  # (B, T, D)
        if targets is None:
            return LmOutput(self.lm_head(x), None)                    # (B, T, V)
        if targets.shape != idx.shape:
            raise ValueError(f"targets {tuple(targets.shape)} must have the shape of idx "
                             f"{tuple(idx.shape)}")
        loss = linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten())
        return LmOutput(None, loss)

    # --- the SAE's view: activations and losses with the MLP replaced -----------------

    @torch.no_grad()
    def mlp_acts(self, idx: Tensor, positions: Tensor | None = None) -> Tensor:
        """Post-GELU activation of the last MLP: idx (B, T) -> (B, T, H), or with
        positions (B, P) long -> (B, P, H) at those positions only.

        Computes no more than that needs: no c_proj, final LN or unembedding; with positions,
        the context is cut after the last sampled position of the batch, and the MLP runs
        only at the sampled rows; on CPU so do queries and attention (keys/values for the
        prefix), the sorted queries in groups over the key prefix each group needs. Equal to
        the full forward's activation: bitwise in float32 when one group spans the whole
        context, else up to last-bit rounding (~1e-7) of attention over a shorter prefix.
        """
        if positions is None:
            return self.mlp_site(idx).acts
        if positions.dim() != 2 or positions.shape[0] != idx.shape[0]:
            raise ValueError(f"positions must be (B, P) with B = {idx.shape[0]}, got "
                             f"{tuple(positions.shape)}")
        positions = positions.long()
        if positions.shape[1] == 0:
            return self.lm_head.weight.new_zeros((idx.shape[0], 0, self.cfg.d_mlp))
        lo, hi = _min_max(positions)
        if lo < 0 or hi >= idx.shape[1]:
            raise ValueError(f"positions must be in [0, {idx.shape[1]}), got min {lo} max {hi}")
        x = self._embed(idx[:, :hi + 1])                              # (B, hi + 1, D)
        last = self.transformer.h[-1]
        if x.device.type not in SAMPLED_ATTENTION_DEVICES:
            resid = (x + last.attn(last.ln_1(x))).gather(1, _rows(positions, x))  # (B, P, D)
            return last.mlp.acts(last.ln_2(resid))                    # (B, P, H)
        positions, order = positions.sort(dim=1)  # ascending: query groups need short prefixes
        chunks = max(1, min(ATTN_CHUNKS, positions.shape[1] // ATTN_MIN_QUERIES))
        resid = x.gather(1, _rows(positions, x)) + last.attn.at(last.ln_1(x), positions, chunks)
        acts = last.mlp.acts(last.ln_2(resid))                        # (B, P, H)
        return torch.empty_like(acts).scatter_(1, order[..., None].expand_as(acts), acts)

    @torch.no_grad()
    def mlp_site(self, idx: Tensor) -> MlpSite:
        """idx (B, T) -> MlpSite: the residual entering the last MLP (B, T, D) and its
        post-GELU activation (B, T, H). One attention pass serves every loss variant."""
        x = self._embed(idx)
        last = self.transformer.h[-1]
        resid = x + last.attn(last.ln_1(x))
        return MlpSite(resid, last.mlp.acts(last.ln_2(resid)))

    @torch.no_grad()
    def loss_from(self, resid: Tensor, acts: Tensor, targets: Tensor,
                  reduction: str = "mean") -> Tensor:
        """Finish the forward with the last MLP's activation replaced by `acts`.

        resid (B, T, D) from `mlp_site`, acts (B, T, H) (the original, zeros for the MLP
        ablation, or an SAE's x_hat), targets (B, T) (-1 = ignore) -> mean cross-entropy,
        or per-token (B, T) with reduction="none".
        """
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        H = self.cfg.d_mlp
        if acts.shape != (*resid.shape[:2], H) or targets.shape != resid.shape[:2]:
            raise ValueError(f"acts {tuple(acts.shape)} and targets {tuple(targets.shape)} "
                             f"must be (B, T, {H}) and (B, T) for resid {tuple(resid.shape)}")
        x = resid + self.transformer.h[-1].mlp.c_proj(acts.to(resid.dtype))  # (B, T, D)
        loss = self._unembed_loss(x.flatten(0, 1), targets.flatten(), reduction)
        return loss.view(targets.shape) if reduction == "none" else loss

    @torch.no_grad()
    def loss_with_mlp_acts(self, idx: Tensor, targets: Tensor, acts: Tensor) -> Tensor:
        """Mean cross-entropy with the last MLP's post-GELU activation replaced by acts
        (B, T, H); zeros give the MLP-ablated loss."""
        return self.loss_from(self.mlp_site(idx).resid, acts, targets)
