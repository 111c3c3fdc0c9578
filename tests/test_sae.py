"""Stage 4 SAE maths: loss, init, geometric median, the fast step (dense and sparse
backward) against autograd, the decoder-norm invariant, fired tracking, checkpoint/resume,
and ground-truth fidelity."""

import itertools
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

import mono.sae
from mono.sae import (
    SPARSE_MAX_DENSITY,
    FeatureAdam,
    SparseAutoencoder,
    Trainer,
    geometric_median,
    project_decoder_grad_,
    reference_step,
)

DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")])]


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny problems gain nothing from 2 threads, and on a shared 2-core box OpenMP's
    # spinning makes 2 threads ~10x slower than 1 under load.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_sae(d_in=16, n_features=48, l1_coeff=1e-2, dtype=torch.float64, device="cpu", seed=0):
    sae = SparseAutoencoder(d_in, n_features, l1_coeff, dtype=dtype, device=device,
                            generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():   # off the symmetric init so every gradient term is exercised
        gen = torch.Generator().manual_seed(seed + 1)
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=gen, dtype=dtype))
        sae.b_enc.copy_(0.1 * torch.randn(n_features, generator=gen, dtype=dtype))
    return sae


def gelu_batch(n, d_in, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.gelu(torch.randn(n, d_in, generator=gen, dtype=dtype))


def test_forward_loss_equals_hand_computation():
    sae = SparseAutoencoder(2, 3, 0.1, dtype=torch.float64)
    W_enc = [[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]]                     # (H, F)
    b_enc = [0.0, -0.5, 0.1]
    W_dec = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]                    # (F, H)
    b_dec = [0.5, -0.5]
    xs = [[1.5, 0.5], [0.5, -0.5]]
    with torch.no_grad():
        for p, v in zip((sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec),
                        (W_enc, b_enc, W_dec, b_dec), strict=True):
            p.copy_(torch.tensor(v, dtype=torch.float64))
    sq, l1 = 0.0, 0.0
    for x in xs:
        xc = [x[h] - b_dec[h] for h in range(2)]
        f = [max(0.0, sum(xc[h] * W_enc[h][j] for h in range(2)) + b_enc[j]) for j in range(3)]
        x_hat = [sum(f[j] * W_dec[j][h] for j in range(3)) + b_dec[h] for h in range(2)]
        sq += sum((x_hat[h] - x[h]) ** 2 for h in range(2))
        l1 += sum(abs(v) for v in f)
    mse, l1 = sq / (2 * 2), l1 / 2
    out = sae(torch.tensor(xs, dtype=torch.float64))
    assert math.isclose(out.mse.item(), mse, rel_tol=1e-12)
    assert math.isclose(out.l1.item(), l1, rel_tol=1e-12)
    assert math.isclose(out.loss.item(), mse + 0.1 * l1, rel_tol=1e-12)
    assert out.x_hat.shape == (2, 2) and out.f.shape == (2, 3)
    # the loss is the batch mean of the per-example loss resampling scores with
    assert_close(sae.per_example_loss(torch.tensor(xs, dtype=torch.float64)).mean(), out.loss)


def test_init_unit_decoder_tied_scaled_encoder_and_seeded():
    a, b = make_sae(seed=3), make_sae(seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.W_dec, make_sae(seed=4).W_dec)
    assert_close(a.W_dec.norm(dim=1), torch.ones(48, dtype=torch.float64))
    assert_close(a.W_enc, a.W_dec.T * (2 * 16 / 48))
    with pytest.raises(ValueError, match="l1_coeff"):
        SparseAutoencoder(4, 8, -1.0)
    with pytest.raises(ValueError, match="n_features=0"):
        SparseAutoencoder(4, 0, 1e-3)


def objective(points: torch.Tensor, y: torch.Tensor) -> float:
    return torch.linalg.vector_norm(points - y, dim=-1).sum(-1).item()


def test_geometric_median_known_cases():
    # 1-D: the ordinary median, far from the mean (22.6)
    pts = torch.tensor([[0.0], [1.0], [2.0], [10.0], [100.0]])
    assert_close(geometric_median(pts), torch.tensor([2.0]), atol=1e-5, rtol=0)
    # square corners plus centre: the mean is a data point (Weiszfeld's 1/0 case) and optimal
    pts = torch.tensor([[0.0, 0.0], [1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]])
    assert_close(geometric_median(pts), torch.zeros(2))
    # a triangle with an angle >= 120 degrees: the median is that vertex
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.1], [-1.0, 0.1]], dtype=torch.float64)
    assert_close(geometric_median(pts), torch.zeros(2, dtype=torch.float64), atol=1e-6, rtol=0)
    # all points equal, and the result keeps the input dtype
    pts = torch.full((7, 3), 2.5, dtype=torch.float32)
    got = geometric_median(pts)
    assert got.dtype == torch.float32 and torch.equal(got, torch.full((3,), 2.5))


def test_geometric_median_matches_brute_force_minimiser():
    gen = torch.Generator().manual_seed(0)
    pts = torch.randn(9, 2, generator=gen, dtype=torch.float64)
    axis = torch.linspace(-2, 2, 801, dtype=torch.float64)                 # step 0.005
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 1, 2)
    costs = torch.linalg.vector_norm(grid - pts, dim=-1).sum(-1)           # (G,)
    best = grid[costs.argmin(), 0]
    got = geometric_median(pts)
    assert objective(pts, got) <= costs.min().item() + 1e-12
    assert torch.linalg.vector_norm(got - best) < 0.01


def test_geometric_median_is_robust_to_outliers():
    gen = torch.Generator().manual_seed(1)
    inliers = torch.randn(1000, 16, generator=gen)
    outliers = torch.full((100, 16), 1e4)
    pts = torch.cat([inliers, outliers])
    got = geometric_median(pts)
    assert pts.mean(0).norm() > 3000
    assert got.norm() < 1.0
    # optimal: no small move lowers the objective
    for d in torch.eye(16)[:4]:
        assert objective(pts, got) <= objective(pts, got + 1e-3 * d) + 1e-3
        assert objective(pts, got) <= objective(pts, got - 1e-3 * d) + 1e-3


def test_init_b_dec_sets_geometric_median():
    sae = make_sae(d_in=4, n_features=8)
    pts = torch.tensor([[0.0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [50, 50, 50, 50]])
    sae.init_b_dec_(pts)
    assert_close(sae.b_dec.detach(), geometric_median(pts).double())
    with pytest.raises(ValueError, match=r"\(M, 4\)"):
        sae.init_b_dec_(torch.zeros(3, 5))


def test_compute_grads_match_autograd():
    sae = make_sae()
    x = gelu_batch(64, 16, seed=0)
    trainer = Trainer(sae, lr=1e-3)
    stats = trainer.compute_grads(x)
    out = sae(x)
    out.loss.backward()
    for name, p in sae.named_parameters():
        assert_close(trainer.grads[name], p.grad, msg=name)
    assert_close(stats.loss, out.loss.detach())
    assert_close(stats.l0, (out.f > 0).sum(1).double().mean())


@pytest.mark.parametrize("path", ["dense", "sparse"])      # "sparse" is dense off the CPU
@pytest.mark.parametrize("device", DEVICES)
def test_fast_step_matches_reference_step(device, path):
    fast, ref = make_sae(device=device), make_sae(device=device)
    trainer = Trainer(fast, lr=1e-3, path=path)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-3)
    for i in range(12):
        x = gelu_batch(64, 16, seed=i).to(device)
        stats = trainer.step(x)
        out = reference_step(ref, opt, x)
        assert_close(stats.loss, out.loss.detach())
        assert_close(stats.mse, out.mse.detach())
        assert_close(stats.l1, out.l1.detach())
        assert trainer.last_path == (path if device == "cpu" else "dense")
    for (name, p), q in zip(fast.named_parameters(), ref.parameters(), strict=True):
        assert_close(p, q, msg=name)
        assert not torch.equal(p, make_sae(device=device).get_parameter(name)), name   # it trained


def low_density_sae(shift, **kw):
    """make_sae with b_enc lowered by `shift`: the trained regime of a few % active."""
    sae = make_sae(**kw)
    with torch.no_grad():
        sae.b_enc -= shift
    return sae


@pytest.mark.parametrize("shift", [0.8, 1.2, 1e3])       # ~5%, ~1.5%, nothing active
@pytest.mark.parametrize("scan", [None, (50, 300)])     # one nonzero() scan, or many
def test_sparse_grads_and_stats_equal_dense(shift, scan, monkeypatch):
    if scan:
        monkeypatch.setattr(mono.sae, "_SCAN_PROBE", scan[0])
        monkeypatch.setattr(mono.sae, "_SCAN_CHUNK", scan[1])
    x = gelu_batch(64, 16, seed=0)
    dense, sparse = (Trainer(low_density_sae(shift), lr=1e-3, path=p)
                     for p in ("dense", "sparse"))
    want, got = dense.compute_grads(x), sparse.compute_grads(x)
    assert sparse.last_path == "sparse" and dense.last_path == "dense"
    density = want.l0.item() / 48
    assert density < 0.06 and (shift < 1e3) == (density > 0)
    for name in dense.grads:
        assert_close(sparse.grads[name], dense.grads[name], msg=name)
    for a, b in zip(got, want, strict=True):
        assert_close(a, b)
    assert torch.equal(sparse.fire_counts, dense.fire_counts)


def test_sparse_steps_equal_dense_steps_at_low_density():
    dense, sparse = (Trainer(low_density_sae(1.0), lr=1e-2, path=p) for p in ("dense", "sparse"))
    for i in range(10):
        x = gelu_batch(64, 16, seed=i)
        assert_close(sparse.step(x).loss, dense.step(x).loss)
    for name, p in dense.sae.named_parameters():
        assert_close(sparse.sae.get_parameter(name), p, msg=name)
    for key, v in dense.state_dict().items():
        assert_close(sparse.state_dict()[key], v, msg=key)
    assert_close(sparse.sae.W_dec.norm(dim=1), torch.ones(48, dtype=torch.float64))


@pytest.mark.parametrize("scan", [None, (50, 300)])
def test_auto_path_dense_at_init_sparse_when_trained_sparse(scan, monkeypatch):
    if scan:
        monkeypatch.setattr(mono.sae, "_SCAN_PROBE", scan[0])
        monkeypatch.setattr(mono.sae, "_SCAN_CHUNK", scan[1])
    x = gelu_batch(256, 16, seed=0)
    at_init = Trainer(SparseAutoencoder(16, 48, 1e-2, dtype=torch.float64,
                                        generator=torch.Generator().manual_seed(0)), lr=1e-3)
    stats = at_init.compute_grads(x)
    assert stats.l0.item() / 48 > 0.2 and at_init.last_path == "dense"
    sparse = Trainer(low_density_sae(1.0), lr=1e-3)
    stats = sparse.compute_grads(x)
    assert stats.l0.item() / 48 <= SPARSE_MAX_DENSITY and sparse.last_path == "sparse"
    with pytest.raises(ValueError, match="path"):
        Trainer(make_sae(), lr=1e-3, path="csr")


@pytest.mark.parametrize("path", ["auto", "sparse"])
@pytest.mark.parametrize("device", DEVICES)
def test_sparse_path_is_cpu_only(device, path):
    trainer = Trainer(low_density_sae(1.0, device=device), lr=1e-3, path=path)
    trainer.compute_grads(gelu_batch(64, 16, seed=0).to(device))
    assert trainer.last_path == ("sparse" if device == "cpu" else "dense")


def test_decoder_unit_norm_every_step_and_projected_grad_orthogonal():
    sae = make_sae(dtype=torch.float32)
    trainer = Trainer(sae, lr=1e-2)
    for i in range(10):
        before = sae.W_dec.detach().clone()
        trainer.step(gelu_batch(64, 16, seed=i, dtype=torch.float32))
        # the gradient the optimizer used has no component along the decoder vectors
        dots = (trainer.grads["W_dec"] * before).sum(1)
        assert dots.abs().max() < 1e-6 * trainer.grads["W_dec"].norm(dim=1).max()
        assert_close(sae.W_dec.norm(dim=1), torch.ones(48), atol=1e-6, rtol=0)
        assert not torch.equal(before, sae.W_dec)


def test_project_decoder_grad_removes_only_the_parallel_part():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 7, generator=gen, dtype=torch.float64)      # not unit: handled
    g = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    orig = g.clone()
    project_decoder_grad_(g, w)
    assert_close((g * w).sum(1), torch.zeros(5, dtype=torch.float64), atol=1e-12, rtol=0)
    parallel = orig - g          # what was removed is a multiple of w, row by row
    assert_close(parallel, w * ((parallel * w).sum(1) / (w * w).sum(1))[:, None])


def test_fired_tracks_active_features_and_resets():
    sae = make_sae()
    with torch.no_grad():
        sae.b_enc[:10] = -1e3          # these can never fire
    trainer = Trainer(sae, lr=1e-4)
    counts = torch.zeros(48, dtype=torch.float64)
    for i in range(2):
        x = gelu_batch(64, 16, seed=i)
        counts += (sae.encode(x) > 0).sum(0)
        trainer.step(x)
    assert not trainer.fired[:10].any()
    assert trainer.fired[10:].all()
    assert torch.equal(trainer.fire_counts, counts)        # per-feature active examples
    trainer.reset_fired()
    assert not trainer.fired.any()


def test_half_precision_input_is_accepted():
    a, b = make_sae(dtype=torch.float32), make_sae(dtype=torch.float32)
    x = gelu_batch(32, 16, seed=0, dtype=torch.float32).half()
    ta, tb = Trainer(a, 1e-3), Trainer(b, 1e-3)
    sa, sb = ta.step(x), tb.step(x.float())
    assert torch.equal(sa.loss, sb.loss) and torch.equal(a.W_enc, b.W_enc)
    with pytest.raises(ValueError, match=r"\(N, 16\)"):
        ta.step(torch.zeros(4, 15))


def test_checkpoint_resume_is_bit_identical(tmp_path):
    batches = [gelu_batch(64, 16, seed=i, dtype=torch.float32) for i in range(10)]
    sae = make_sae(dtype=torch.float32)
    trainer = Trainer(sae, lr=1e-3)
    for x in batches[:5]:
        trainer.step(x)
    trainer.opt.reset_features_(torch.tensor([1, 7]))   # uneven step counts survive too
    save_file({**sae.state_dict(), **{f"trainer.{k}": v for k, v in trainer.state_dict().items()}},
              tmp_path / "ckpt.safetensors")
    for x in batches[5:]:
        trainer.step(x)

    state = load_file(tmp_path / "ckpt.safetensors")
    resumed = make_sae(dtype=torch.float32, seed=99)        # different weights, overwritten
    resumed.load_state_dict({k: v for k, v in state.items() if not k.startswith("trainer.")})
    again = Trainer(resumed, lr=1e-3)
    again.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("trainer.")})
    assert again.n_steps == 5
    for x in batches[5:]:
        again.step(x)
    for name, p in sae.named_parameters():
        assert torch.equal(p, resumed.get_parameter(name)), name
    for key, v in trainer.state_dict().items():
        assert torch.equal(v, again.state_dict()[key]), key


def test_feature_adam_load_rejects_wrong_shapes():
    opt = FeatureAdam(make_sae(), lr=1e-3)
    state = dict(opt.state_dict())
    state["exp_avg.W_enc"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="exp_avg.W_enc"):
        opt.load_state_dict(state)
    with pytest.raises(ValueError, match="lr"):
        FeatureAdam(make_sae(), lr=0.0)


def ground_truth_problem(seed=0, d_in=64, n_true=256, p_active=0.02):
    """n_true random unit features in d_in dims, each active with prob p_active and
    magnitude U(0.5, 1.5): x = sum of the active ones (~5 per example)."""
    gen = torch.Generator().manual_seed(seed)
    true = torch.randn(n_true, d_in, generator=gen)
    true /= true.norm(dim=1, keepdim=True)

    def batch(n):
        on = torch.rand(n, n_true, generator=gen) < p_active
        return (on * torch.rand(n, n_true, generator=gen).add(0.5)) @ true

    return true, batch


def max_cosines(true: torch.Tensor, sae: SparseAutoencoder) -> torch.Tensor:
    """(G,) for each true feature, its best cosine with any (unit) decoder vector."""
    return (true @ sae.W_dec.detach().T).max(dim=1).values


def test_fidelity_recovers_ground_truth_features():
    true, batch = ground_truth_problem()
    sae = SparseAutoencoder(64, 512, 1e-2, generator=torch.Generator().manual_seed(0))
    sae.init_b_dec_(batch(2048))
    trainer = Trainer(sae, lr=3e-3)
    first = trainer.step(batch(512))
    for _ in range(599):
        last = trainer.step(batch(512))
    cos = max_cosines(true, sae)
    assert cos.mean() >= 0.95, cos.mean()
    assert last.loss < 0.5 * first.loss
    assert 2 <= last.l0 <= 60     # sparse (about 5 true features per example)


def test_fast_step_is_deterministic_under_seed():
    runs = []
    for _ in range(2):
        sae = make_sae(dtype=torch.float32, seed=5)
        trainer = Trainer(sae, lr=1e-3)
        for i in range(3):
            trainer.step(gelu_batch(32, 16, seed=i, dtype=torch.float32))
        runs.append(sae.state_dict())
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k


def test_shapes_and_stats_types():
    sae = make_sae(d_in=8, n_features=24, dtype=torch.float32)
    trainer = Trainer(sae, lr=1e-3)
    for n in (16, 5, 16):          # a short last batch reallocates the buffers, then again
        stats = trainer.step(gelu_batch(n, 8, seed=n, dtype=torch.float32))
        assert all(s.ndim == 0 and np.isfinite(float(s)) for s in stats)
    assert trainer.n_steps == 3
    assert {k: tuple(v.shape) for k, v in sae.state_dict().items()} == {
        "W_enc": (8, 24), "b_enc": (24,), "W_dec": (24, 8), "b_dec": (8,)}
    assert list(itertools.islice(sae.state_dict(), 4)) == ["W_dec", "W_enc", "b_enc", "b_dec"]
