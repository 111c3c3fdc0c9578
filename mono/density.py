"""Stage 4: feature fire counts over the SAE's training stream -> densities that resolve 1/rows.

Reads and writes nothing itself: `train_sae` folds the trainer's per-feature fire counts
(float64 numbers of training rows with f > 0) into a `FireCounts` and checkpoints its
`state_dict()` next to the trainer's.

Why the training stream: eval-token densities resolve only 1 / eval tokens (6e-5 on the
demo, 1.5e-5 at paper scale), so an ultralow count (< 1e-5) there is 0 by construction and a
feature firing once in a million rows counts as dead. The training stream passes millions
of rows between evals (paper: 8.2 M per 1000 steps), resolving ~1e-7.

Two windows, both exact counts over the rows they cover:
- since the last eval: every training row since the previous eval (reset at each eval);
- trailing: the last `window` rows, kept as a ring of BLOCKS + 1 blocks of
  ceil(window / (BLOCKS x batch)) steps each: the current, partial block and the BLOCKS
  before it, so the window covers between `window` and 1.125 x `window` rows once the run
  is that long (all rows so far before). Its true row count is reported beside it.

Shapes: F features, K = BLOCKS + 1 ring slots.

Limits: a resampled feature's trailing counts include its predecessor's rows (which were
dead for dead_window steps before the resample, so usually none).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

BLOCKS = 8
"""Full blocks of the trailing window (the ring holds one more, the current block)."""
DENSE = 1e-2
"""Features above this density count as dense (paper, seed)."""
_PREFIX = "fires."


class Densities(NamedTuple):
    """Per-feature densities over one window."""

    density: np.ndarray
    """(F,) float64: fraction of the window's rows on which the feature fired."""
    rows: int
    """Rows the window covers (the resolution is 1 / rows)."""


def block_steps(window: int, batch_size: int) -> int:
    """Steps per block of the trailing window."""
    return max(1, math.ceil(window / (BLOCKS * batch_size)))


def counts(density: np.ndarray, ultralow: float, dense: float = DENSE) -> dict[str, int]:
    """{"dead", "ultralow", "dense"}: features with density 0, in (0, ultralow), > dense."""
    return {"dead": int((density == 0).sum()),
            "ultralow": int(((density > 0) & (density < ultralow)).sum()),
            "dense": int((density > dense).sum())}


class FireCounts:
    """Fire counts since the last eval and over the trailing window (module doc).

    Per step `add_rows(n)`; whenever the trainer's counts are folded, `add(counts)`; at
    every block boundary (`step % self.block_steps == 0`, right after folding) `advance()`.
    """

    def __init__(self, n_features: int, block_steps: int, device: torch.device | str = "cpu"):
        self.block_steps = block_steps
        f64 = dict(dtype=torch.float64, device=device)
        self.since_eval = torch.zeros(n_features, **f64)                     # (F,)
        self.since_eval_rows = 0
        self.ring = torch.zeros(BLOCKS + 1, n_features, **f64)               # (K, F)
        self.ring_rows = [0] * (BLOCKS + 1)
        self.slot = 0

    def add_rows(self, n: int) -> None:
        self.since_eval_rows += n
        self.ring_rows[self.slot] += n

    def add(self, fire_counts: Tensor) -> None:
        """fire_counts (F,) float64: rows each feature fired on since the previous add."""
        self.since_eval += fire_counts
        self.ring[self.slot] += fire_counts

    def advance(self) -> None:
        """Close the current block: the oldest one leaves the window."""
        self.slot = (self.slot + 1) % len(self.ring_rows)
        self.ring[self.slot].zero_()
        self.ring_rows[self.slot] = 0

    def window(self) -> Densities:
        rows = sum(self.ring_rows)
        return Densities((self.ring.sum(dim=0) / max(rows, 1)).cpu().numpy(), rows)

    def take_since_eval(self) -> Densities:
        """The since-eval densities; resets them (call at each eval)."""
        out = Densities((self.since_eval / max(self.since_eval_rows, 1)).cpu().numpy(),
                        self.since_eval_rows)
        self.since_eval.zero_()
        self.since_eval_rows = 0
        return out

    def state_dict(self) -> dict[str, Tensor]:
        """Flat name -> tensor (safetensors-ready)."""
        ints = torch.tensor([self.since_eval_rows, self.slot, self.block_steps, *self.ring_rows],
                            dtype=torch.int64)
        return {f"{_PREFIX}since_eval": self.since_eval, f"{_PREFIX}ring": self.ring,
                f"{_PREFIX}ints": ints}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Inverse of `state_dict`; ValueError if the parts are missing or misshapen (another
        dictionary size or window)."""
        try:
            since, ring, ints = (state[f"{_PREFIX}{k}"] for k in ("since_eval", "ring", "ints"))
        except KeyError as err:
            raise ValueError(f"fire counts missing: {err}") from err
        if since.shape != self.since_eval.shape or ring.shape != self.ring.shape or \
                len(ints) != 3 + len(self.ring_rows) or int(ints[2]) != self.block_steps:
            raise ValueError(f"fire counts of shape {tuple(ring.shape)} with {int(ints[2])}-step "
                             f"blocks do not fit {tuple(self.ring.shape)} with "
                             f"{self.block_steps}-step blocks")
        self.since_eval.copy_(since)
        self.ring.copy_(ring)
        values = [int(v) for v in ints]
        self.since_eval_rows, self.slot, self.ring_rows = values[0], values[1], values[3:]
