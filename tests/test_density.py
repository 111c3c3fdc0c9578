"""Stage 4: training-stream fire counts (mono.density) resolve densities down to 1 / rows.

A synthetic stream of 16 M rows with features firing at known rates down to 1e-6: each
step's fire counts are Binomial(batch, rate) draws, folded as train_sae folds the trainer's
counts (at every block boundary and eval). A short run of the real `Trainer` checks that its
counts are the rows each feature fired on.
"""

import math

import numpy as np
import pytest
import torch

from mono import density
from mono.sae import SparseAutoencoder, Trainer

RATES = np.array([0.0, 1e-6, 3e-6, 3e-5, 1e-3, 2e-2, 0.5, 3e-5])
STOP = 600  # feature 7 stops firing after this step: dead in the trailing window
BATCH, STEPS, EVAL = 8192, 2000, 1000
WINDOW = 1000 * BATCH  # 8.2 M rows: ~8 expected fires at 1e-6


def test_training_stream_densities_resolve_down_to_1e6():
    rng = np.random.default_rng(0)
    fires = density.FireCounts(len(RATES), density.block_steps(WINDOW, BATCH))
    assert fires.block_steps == 125  # 1000 / 8
    pending = torch.zeros(len(RATES), dtype=torch.float64)  # the trainer's fire_counts
    exact, evals = [], []
    for step in range(1, STEPS + 1):
        p = RATES if step <= STOP else np.where(np.arange(len(RATES)) == 7, 0.0, RATES)
        counts = torch.from_numpy(rng.binomial(BATCH, p).astype(np.float64))
        exact.append(counts)
        pending += counts
        fires.add_rows(BATCH)
        if step % fires.block_steps == 0:
            fires.add(pending)
            pending.zero_()
            fires.advance()
        if step % EVAL == 0:
            fires.add(pending)
            pending.zero_()
            evals.append((step, fires.window(), fires.take_since_eval()))
    exact = torch.stack(exact)                                               # (steps, F)
    for step, window, since in evals:
        # since the last eval: exactly the rows of the last EVAL steps
        assert since.rows == EVAL * BATCH
        np.testing.assert_array_equal(np.round(since.density * since.rows),
                                      exact[step - EVAL:step].sum(0).numpy())
        # trailing window: the current partial block + the 8 whole blocks before it
        steps_in = step % 125 + 8 * 125
        assert window.rows == steps_in * BATCH and window.rows >= WINDOW
        np.testing.assert_array_equal(np.round(window.density * window.rows),
                                      exact[step - steps_in:step].sum(0).numpy())
    step, window, since = evals[-1]
    expected = np.where(np.arange(len(RATES)) == 7, 0.0, RATES)
    for d in (window.density, since.density):
        for i, (got, want) in enumerate(zip(d, expected)):
            err = 4 * math.sqrt(want / window.rows) + 1 / window.rows  # counting error
            assert abs(got - want) <= err, (i, got, want)
    assert density.counts(window.density, 1e-5) == {"dead": 2, "ultralow": 2, "dense": 2}
    assert 0 < window.density[1] < 3e-6  # what 16 k eval tokens (resolution 6e-5) call dead
    assert evals[0][1].density[7] > 0  # the first window still held its firing before STOP


def test_trainer_counts_the_rows_each_feature_fired_on():
    """W_enc = I, b = 0, inputs +-1: feature i fires exactly where input i is +1."""
    n, rng = 6, np.random.default_rng(2)
    sae = SparseAutoencoder(n, n, 1e-3)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(n))
        sae.W_dec.copy_(torch.eye(n))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    trainer = Trainer(sae, lr=1e-30)  # the SAE stays put
    fires, total = density.FireCounts(n, 2), torch.zeros(n, dtype=torch.float64)
    for step in range(1, 6):
        x = torch.from_numpy(np.where(rng.random((512, n)) < [0, .001, .01, .1, .5, 1],
                                      1.0, -1.0).astype(np.float32))
        total += (x > 0).sum(0).double()
        trainer.step(x)
        fires.add_rows(len(x))
        if step % 2 == 0:
            fires.add(trainer.fire_counts)
            trainer.reset_fired()
    fires.add(trainer.fire_counts)
    since = fires.take_since_eval()
    assert since.rows == 5 * 512
    np.testing.assert_array_equal(np.round(since.density * since.rows), total.numpy())


def test_fire_counts_resume_exactly_mid_block():
    rng = np.random.default_rng(1)
    a = density.FireCounts(4, 3)
    for _ in range(7):
        a.add_rows(10)
        a.add(torch.from_numpy(rng.integers(0, 10, 4).astype(np.float64)))
        a.advance() if rng.random() < 0.5 else None
    b = density.FireCounts(4, 3)
    b.load_state_dict({k: v.clone() for k, v in a.state_dict().items()})
    for fc in (a, b):
        fc.add_rows(5)
        fc.add(torch.ones(4, dtype=torch.float64))
        fc.advance()
    assert a.window().rows == b.window().rows
    np.testing.assert_array_equal(a.window().density, b.window().density)
    np.testing.assert_array_equal(a.take_since_eval().density, b.take_since_eval().density)
    with pytest.raises(ValueError, match="do not fit"):
        density.FireCounts(4, 5).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="missing"):
        density.FireCounts(4, 3).load_state_dict({})
