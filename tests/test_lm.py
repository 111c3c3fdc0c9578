"""Stage 2: the one-layer transformer (mono.lm) and its checkpoints (store.save_lm/load_lm).

Reference tests: the fast paths (`mlp_acts` at sampled positions, `loss_from` with the MLP
replaced) against a plain full forward with a hook on the GELU, as the seed's HookedGPT did.
"""

import copy
import dataclasses

import pytest
import torch

from mono import store
from mono.config import PRESETS, LmConfig
from mono.lm import Lm, linear_cross_entropy

TINY = PRESETS["tiny"].lm


def hooked_acts(model: Lm, idx: torch.Tensor) -> torch.Tensor:
    """The last block's post-GELU activation inside a full forward (seed: HookedGPT)."""
    seen = []
    handle = model.transformer.h[-1].mlp.gelu.register_forward_hook(
        lambda mod, inp, out: seen.append(out.detach().clone()))
    with torch.no_grad():
        model(idx)
    handle.remove()
    return seen[0]


def gather(t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return t.gather(1, positions[..., None].expand(-1, -1, t.shape[-1]))


@pytest.fixture
def model() -> Lm:
    return Lm(TINY).eval()


def tokens(b: int, t: int) -> torch.Tensor:
    return torch.randint(0, 50257, (b, t))


def test_paper_lm_has_the_seeds_parameter_count():
    m = Lm(PRESETS["paper"].lm)
    # seed_spec §2: ≈6.64 M without the position embedding, 6.44 M of it the token embedding
    assert m.num_params() == 6_635_904
    assert m.transformer.wte.weight.numel() == 50304 * 128 == 6_438_912
    assert m.num_params(non_embedding=False) == 6_635_904 + 1024 * 128


def test_architecture_is_the_seeds():
    m = Lm(dataclasses.replace(PRESETS["paper"].lm, n_layer=2))
    names = [n for n, _ in m.named_parameters()]
    assert all(n.endswith(".weight") for n in names)                    # no biases anywhere
    assert m.lm_head.weight is m.transformer.wte.weight                  # tied embeddings
    assert "lm_head.weight" not in names                                 # counted once
    assert m.transformer.h[0].mlp.gelu.approximate == "none"             # exact GELU
    c_proj = torch.cat([m.transformer.h[i].mlp.c_proj.weight.flatten() for i in range(2)])
    c_fc = m.transformer.h[0].mlp.c_fc.weight
    assert c_proj.std().item() == pytest.approx(0.02 / (2 * 2) ** 0.5, rel=0.05)
    assert c_fc.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(m.transformer.h[0].ln_1.weight, torch.ones(128))


def test_forward_shapes_and_loss(model):
    idx = tokens(2, 16)
    logits, loss = model(idx)
    assert logits.shape == (2, 16, 50304) and loss is None
    targets = idx.roll(-1, dims=1)
    targets[:, -1] = -1                                           # ignored
    out = model(idx, targets)
    assert out.logits is None                                     # never materialised
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                            ignore_index=-1)
    torch.testing.assert_close(out.loss, ref)
    with pytest.raises(ValueError, match="targets"):
        model(idx, targets[:, :8])


@pytest.mark.parametrize("chunk", [5, 128])
def test_linear_cross_entropy_equals_the_unfused_loss_and_grads(chunk):
    """The chunked training loss: value and both gradients equal autograd through
    F.cross_entropy(h @ W.T) in float64, with ignored targets and a partial last chunk."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(37, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    W = torch.randn(300, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randint(0, 300, (37,), generator=gen)
    t[::4] = -1
    loss = linear_cross_entropy(h, W, t, chunk)
    (3 * loss).backward()
    grads = h.grad, W.grad
    h.grad = W.grad = None
    ref = torch.nn.functional.cross_entropy(h @ W.T, t, ignore_index=-1)
    (3 * ref).backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0], h.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads[1], W.grad, rtol=1e-10, atol=1e-12)


def test_linear_cross_entropy_under_bf16_autocast():
    """Under autocast the matmuls run in bf16, the softmax in fp32; grads keep the dtypes."""
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(16, 32, generator=gen, requires_grad=True)
    W = (0.1 * torch.randn(100, 32, generator=gen)).requires_grad_()
    t = torch.randint(0, 100, (16,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, W, t)
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == W.grad.dtype == torch.float32
    ref = torch.nn.functional.cross_entropy(h @ W.T, t)
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=2e-2)


def test_mlp_acts_equals_the_activation_inside_a_full_forward(model):
    idx = tokens(3, 64)
    acts = model.mlp_acts(idx)
    assert acts.shape == (3, 64, TINY.d_mlp) and not acts.requires_grad
    assert torch.equal(acts, hooked_acts(model, idx))


def test_mlp_acts_at_positions_equals_the_full_forward(model):
    idx = tokens(4, 64)
    full = hooked_acts(model, idx)
    # positions reaching the last one: no context cut, the very same float32 result
    positions = torch.stack([torch.randperm(64)[:16] for _ in range(4)])
    positions[:, 0] = 63
    assert torch.equal(model.mlp_acts(idx, positions), gather(full, positions))
    # rows ending at different positions (last of the batch 40 < T): context cut at 41
    positions = torch.stack([torch.randperm(n)[:8] for n in (9, 20, 33, 41)])
    positions[:, 0] = torch.tensor([8, 19, 32, 40])
    got = model.mlp_acts(idx, positions)
    assert got.shape == (4, 8, TINY.d_mlp)
    torch.testing.assert_close(got, gather(full, positions), rtol=1e-5, atol=1e-6)
    # every position, shuffled: sorted queries attend in 2 groups over their own key prefixes
    positions = torch.stack([torch.randperm(64) for _ in range(4)])
    torch.testing.assert_close(model.mlp_acts(idx, positions), gather(full, positions),
                               rtol=1e-5, atol=1e-6)
    # a single position per row, in any order, int16 as the activation shards store it
    one = torch.tensor([[5], [0], [63], [17]], dtype=torch.int16)
    torch.testing.assert_close(model.mlp_acts(idx, one), gather(full, one.long()),
                               rtol=1e-5, atol=1e-6)


def test_mlp_acts_at_positions_on_the_gpu_path(model, monkeypatch):
    """The path GPUs take (one causal attention pass, the MLP at sampled rows), on CPU."""
    monkeypatch.setattr("mono.lm.SAMPLED_ATTENTION_DEVICES", ())
    idx = tokens(3, 64)
    positions = torch.tensor([[40, 2, 17], [0, 1, 39], [33, 12, 5]])
    torch.testing.assert_close(model.mlp_acts(idx, positions),
                               gather(hooked_acts(model, idx), positions), rtol=1e-5, atol=1e-6)


def test_mlp_acts_at_positions_with_several_blocks():
    m = Lm(dataclasses.replace(TINY, n_layer=3)).eval()
    idx = tokens(2, 64)
    positions = torch.tensor([[3, 30, 11], [50, 0, 7]])
    torch.testing.assert_close(m.mlp_acts(idx, positions), gather(hooked_acts(m, idx), positions),
                               rtol=1e-5, atol=1e-6)


def test_replacing_the_mlp_activation_gives_original_and_ablated_losses(model):
    idx = tokens(3, 48)
    x, y = idx[:, :-1], idx[:, 1:]
    with torch.no_grad():
        original = model(x, y).loss
    site = model.mlp_site(x)
    assert site.resid.shape == (3, 47, TINY.d_model) and not site.resid.requires_grad
    # the activation itself reproduces the loss; zeros equal a model without the MLP
    torch.testing.assert_close(model.loss_from(site.resid, site.acts, y), original,
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model.loss_with_mlp_acts(x, y, site.acts), original,
                               rtol=1e-6, atol=1e-6)
    ablated = copy.deepcopy(model)
    torch.nn.init.zeros_(ablated.transformer.h[-1].mlp.c_proj.weight)
    with torch.no_grad():
        ablated_loss = ablated(x, y).loss
    zero = torch.zeros_like(site.acts)
    torch.testing.assert_close(model.loss_with_mlp_acts(x, y, zero), ablated_loss,
                               rtol=1e-6, atol=1e-6)
    assert not torch.allclose(ablated_loss, original)
    per_token = model.loss_from(site.resid, site.acts, y, reduction="none")
    assert per_token.shape == (3, 47)
    torch.testing.assert_close(per_token.mean(), original, rtol=1e-6, atol=1e-6)


def test_loss_from_ignores_minus_one_targets_and_chunks(model, monkeypatch):
    idx = tokens(2, 32)
    x, y = idx[:, :-1], idx[:, 1:].clone()
    y[:, -5:] = -1
    with torch.no_grad():
        original = model(x, y).loss
    monkeypatch.setattr("mono.lm.LOSS_CHUNK_TOKENS", 7)  # several chunks, a ragged last one
    site = model.mlp_site(x)
    torch.testing.assert_close(model.loss_from(site.resid, site.acts, y), original,
                               rtol=1e-6, atol=1e-6)


def test_bad_inputs_raise(model):
    with pytest.raises(ValueError, match="longer than the LM's block_size 64"):
        model(tokens(1, 65))
    with pytest.raises(ValueError, match="longer than the LM's block_size"):
        model.mlp_acts(tokens(1, 65))
    bad = tokens(1, 8)
    bad[0, 3] = 50304
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 50304\).*max 50304"):
        model.mlp_acts(bad)
    bad[0, 3] = -1
    with pytest.raises(ValueError, match="min -1"):
        model(bad)
    with pytest.raises(ValueError, match="positions must be in"):
        model.mlp_acts(tokens(2, 8), torch.tensor([[0, 8], [1, 2]]))
    with pytest.raises(ValueError, match=r"positions must be \(B, P\)"):
        model.mlp_acts(tokens(2, 8), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="idx must be a"):
        model(torch.zeros(8, dtype=torch.long))
    site = model.mlp_site(tokens(2, 8))
    with pytest.raises(ValueError, match="acts"):
        model.loss_from(site.resid, site.acts[:, :4], tokens(2, 8))


def test_checkpoint_round_trip_reproduces_logits(tmp_path, model):
    cfg = dataclasses.replace(PRESETS["tiny"], out=str(tmp_path))
    store.save_lm(store.Layout(cfg.out).lm, model, cfg)
    loaded = store.load_lm(cfg.out, expect=cfg.lm)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight     # tying survives
    idx = tokens(2, 64)
    with torch.no_grad():
        assert torch.equal(loaded(idx).logits, model(idx).logits)
    assert store.lm_config(store.Layout(cfg.out).lm) == cfg.lm
    assert store.load_train_state(store.Layout(cfg.out).lm) is None


def test_checkpoint_errors(tmp_path, model):
    cfg = dataclasses.replace(PRESETS["tiny"], out=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no LM checkpoint"):
        store.load_lm(cfg.out)
    lm_dir = store.Layout(cfg.out).lm
    store.save_lm(lm_dir, model, cfg)
    wanted = LmConfig(d_model=64, n_head=2, d_mlp=128, block_size=64)
    with pytest.raises(ValueError, match=r"does not match the requested LmConfig: d_model=32 "
                                         r"\(asked 64\)"):
        store.load_lm(cfg.out, expect=wanted)
    (tmp_path / "lm" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="unreadable LM weights .*model.safetensors"):
        store.load_lm(cfg.out)
    (tmp_path / "lm" / "train_state.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="unreadable LM train state"):
        store.load_train_state(lm_dir)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_mlp_acts_match_the_full_forward():
    torch.manual_seed(0)
    m = Lm(PRESETS["paper"].lm).cuda().eval()
    idx = tokens(4, 1024).cuda()
    positions = torch.stack([torch.randperm(1024)[:200] for _ in range(4)]).cuda()
    full = hooked_acts(m, idx)
    torch.testing.assert_close(m.mlp_acts(idx, positions), gather(full, positions),
                               rtol=1e-4, atol=1e-5)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf = m.mlp_acts(idx, positions)
    torch.testing.assert_close(bf.float(), gather(full, positions), rtol=0.05, atol=0.02)
