"""Stage 4 resampling: the source, loss^2 sampling, the weight surgery, the optimizer reset
(a resampled row's first update is a fresh Adam's), and that it revives dead features."""

import logging

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from mono.resample import ArraySource, ResampleSource, choose_inputs, resample, score_inputs
from mono.sae import SparseAutoencoder, Trainer

DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")])]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()     # see tests/test_sae.py: 1 thread is faster on tiny problems
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gelu_rows(n, d_in, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d_in))
    return (x * 0.5 * (1 + np.tanh(0.8 * x))).astype(np.float32)    # GELU-shaped, >= -0.17


def trained(d_in=16, n_features=48, steps=5, lr=1e-3, device="cpu"):
    sae = SparseAutoencoder(d_in, n_features, 1e-2, device=device,
                            generator=torch.Generator().manual_seed(0))
    trainer = Trainer(sae, lr=lr)
    for i in range(steps):
        trainer.step(torch.from_numpy(gelu_rows(64, d_in, seed=100 + i)).to(device))
    return trainer


def snapshot(trainer):
    return {**{k: v.detach().clone() for k, v in trainer.sae.state_dict().items()},
            **{k: v.clone() for k, v in trainer.state_dict().items()}}


def test_array_source_is_seeded_fresh_and_distinct():
    acts = gelu_rows(100, 4, seed=0)
    a, b = ArraySource(acts, seed=7), ArraySource(acts, seed=7)
    first = a.sample(30)
    assert isinstance(a, ResampleSource)
    assert np.array_equal(first, b.sample(30))
    assert not np.array_equal(first, a.sample(30))          # a fresh draw each call
    assert len(np.unique(first, axis=0)) == 30
    assert np.array_equal(np.sort(a.sample(100), axis=0), np.sort(acts, axis=0))
    with pytest.raises(ValueError, match="holds 100 rows, asked for 101"):
        a.sample(101)
    with pytest.raises(ValueError, match="shape"):
        ArraySource(np.zeros(5))


def test_choose_inputs_is_proportional_to_score():
    rng = np.random.default_rng(0)
    picks = np.concatenate([choose_inputs(np.array([1.0, 3.0, 0.0]), 1, rng) for _ in range(4000)])
    assert 2 not in picks
    assert abs((picks == 1).mean() - 0.75) < 0.03


def test_choose_inputs_without_replacement_and_beyond_multinomial_limit():
    rng = np.random.default_rng(0)
    picks = choose_inputs(np.ones(100), 50, rng)
    assert len(set(picks.tolist())) == 50
    # more categories than torch.multinomial accepts (2^24)
    scores = np.zeros(2**24 + 8)
    scores[[5, 2**24 + 3, 2**24 + 7]] = [1.0, 2.0, 3.0]
    assert sorted(choose_inputs(scores, 3, rng).tolist()) == [5, 2**24 + 3, 2**24 + 7]


def test_choose_inputs_edge_cases(caplog):
    rng = np.random.default_rng(0)
    with caplog.at_level(logging.WARNING):
        assert choose_inputs(np.array([0.0, 0.0, 1.0]), 2, rng).tolist() == [2, 2]
    assert "with replacement" in caplog.text
    assert len(choose_inputs(np.zeros(4), 2, rng)) == 2          # all zero: uniform
    with pytest.raises(ValueError, match="finite"):
        choose_inputs(np.array([1.0, np.nan]), 1, rng)


def test_score_is_squared_per_example_training_loss():
    trainer = trained()
    x = gelu_rows(50, 16, seed=1)
    got = score_inputs(trainer, x, batch_size=16)                 # several chunks
    with torch.no_grad():
        out = trainer.sae(torch.from_numpy(x))
    per_example = ((out.x_hat - torch.from_numpy(x)) ** 2).mean(1) + 1e-2 * out.f.sum(1)
    assert_close(torch.from_numpy(got), per_example.double() ** 2)


def test_resample_follows_the_recipe_and_touches_only_dead_features():
    trainer = trained()
    sae = trainer.sae
    dead = torch.zeros(48, dtype=torch.bool)
    dead[[3, 10, 20]] = True
    normal = gelu_rows(400, 16, seed=2)
    rng = np.random.default_rng(3)
    loud = (100 * rng.standard_normal((3, 16))).astype(np.float32)   # by far the largest loss
    source = ArraySource(np.concatenate([normal, loud]), seed=0)
    before = snapshot(trainer)
    alive_norm = sae.W_enc.detach()[:, ~dead].norm(dim=0).mean()

    result = resample(trainer, dead, source, n_inputs=403, rng=np.random.default_rng(0))

    assert result.n_resampled == 3 and result.features.tolist() == [3, 10, 20]
    assert sorted(result.inputs.tolist()) == [400, 401, 402]        # sorted sample: loud rows last
    unit_loud = torch.from_numpy(loud / np.linalg.norm(loud, axis=1, keepdims=True))
    dec = sae.W_dec.detach()[dead]                                    # (3, H)
    assert_close((dec @ unit_loud.T).max(1).values, torch.ones(3))   # each = some unit input
    assert_close(torch.linalg.matrix_rank(dec), torch.tensor(3))    # ... a different one each
    assert_close(sae.W_enc.detach()[:, dead].T, dec * 0.2 * alive_norm)
    assert_close(result.encoder_norm, 0.2 * alive_norm.item())
    assert torch.equal(sae.b_enc.detach()[dead], torch.zeros(3))

    after = snapshot(trainer)
    feature_axis = {"W_enc": 1, "W_dec": 0, "b_enc": 0}
    for key, old in before.items():
        new = after[key]
        name = key.split(".")[-1]
        if name in feature_axis or key == "adam.feature_step":
            axis = feature_axis.get(name, 0)
            keep = old.index_select(axis, torch.nonzero(~dead).squeeze(1))
            assert torch.equal(keep, new.index_select(axis, torch.nonzero(~dead).squeeze(1))), key
            if key.startswith("adam."):       # moments and step counts of dead rows: zero
                gone = new.index_select(axis, torch.nonzero(dead).squeeze(1))
                assert not gone.any(), key
        else:                                 # b_dec, its state, fired, n_steps
            assert torch.equal(old, new), key


def test_no_dead_features_changes_nothing():
    trainer = trained()
    before = snapshot(trainer)
    result = resample(trainer, torch.zeros(48, dtype=torch.bool),
                      ArraySource(gelu_rows(10, 16, 0)), 10, np.random.default_rng(0))
    assert result.n_resampled == 0
    assert all(torch.equal(v, snapshot(trainer)[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="bool mask"):
        resample(trainer, torch.zeros(47, dtype=torch.bool), ArraySource(gelu_rows(10, 16, 0)),
                 10, np.random.default_rng(0))


@pytest.mark.parametrize("device", DEVICES)
def test_first_update_of_a_resampled_row_is_a_fresh_adam_step(device):
    lr = 1e-3
    trainer = trained(lr=lr, device=device)
    trainer.opt.feature_step += 25_000      # resample late in training, as at step 25k
    trainer.opt.b_dec_step += 25_000
    dead = torch.zeros(48, dtype=torch.bool, device=device)
    dead[::4] = True
    resample(trainer, dead, ArraySource(gelu_rows(500, 16, 1)), 500, np.random.default_rng(0))
    assert_close(trainer.sae.W_dec.norm(dim=1), torch.ones(48, device=device))

    x = torch.from_numpy(gelu_rows(64, 16, seed=9)).to(device)
    trainer.compute_grads(x)
    grads = {k: v.clone() for k, v in trainer.grads.items()}
    w_before, b_before = trainer.sae.W_enc.detach().clone(), trainer.sae.b_enc.detach().clone()
    trainer.step(x)
    got_w = (trainer.sae.W_enc.detach() - w_before)[:, dead]
    got_b = (trainer.sae.b_enc.detach() - b_before)[dead]

    def first_update(param, grad, step=0):
        """torch.optim.Adam's update of `param` under `grad`, from zero moments at `step`."""
        p = torch.nn.Parameter(param.clone())
        opt = torch.optim.Adam([p], lr=lr)
        p.grad = grad.clone()
        if step:
            opt.state[p] = {"step": torch.tensor(float(step)), "exp_avg": torch.zeros_like(p),
                            "exp_avg_sq": torch.zeros_like(p)}
        opt.step()
        return p.detach() - param

    fresh_w = first_update(w_before, grads["W_enc"])[:, dead]
    assert_close(got_w, fresh_w)
    assert_close(got_b, first_update(b_before, grads["b_enc"])[dead])
    moved = got_w[grads["W_enc"][:, dead] != 0].abs()
    assert moved.max() <= lr * (1 + 1e-5) and moved.min() > 0.5 * lr     # ~lr per element
    # the seed's reset (moments zeroed, step kept at ~25k) moves the same rows ~3.2x as far
    seed_w = first_update(w_before, grads["W_enc"], step=25_005)[:, dead]
    assert (seed_w.abs().max() / got_w.abs().max()) > 3.0


def count_alive(trainer, batch, steps):
    trainer.reset_fired()
    for _ in range(steps):
        trainer.step(batch(256))
    return int(trainer.fired.sum())


def test_resampling_revives_a_bad_start():
    gen = torch.Generator().manual_seed(0)
    true = torch.randn(256, 64, generator=gen)
    true /= true.norm(dim=1, keepdim=True)

    def batch(n):
        on = torch.rand(n, 256, generator=gen) < 0.02
        return (on * torch.rand(n, 256, generator=gen).add(0.5)) @ true

    pool = ArraySource(batch(4096).numpy(), seed=0)
    alive = {}
    for with_resampling in (False, True):
        sae = SparseAutoencoder(64, 512, 1e-2, generator=torch.Generator().manual_seed(1))
        sae.init_b_dec_(batch(1024))
        with torch.no_grad():
            sae.b_enc[:384] = -10.0          # three quarters of the features start dead
        trainer = Trainer(sae, lr=3e-3)
        count_alive(trainer, batch, 100)
        if with_resampling:
            dead = ~trainer.fired            # did not fire in the last 100 steps
            result = resample(trainer, dead, pool, 4096, np.random.default_rng(0))
            assert result.n_resampled >= 384
        alive[with_resampling] = count_alive(trainer, batch, 100)
    assert alive[False] <= 128 + 8
    assert alive[True] > alive[False] + 200, alive
