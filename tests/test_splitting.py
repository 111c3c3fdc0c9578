"""Feature splitting (mono.splitting): dictionary size as a sweep axis, matching across sizes,
families, and the stage's job."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mono import splitting, store, sweep
from mono.config import PRESETS, SweepConfig, with_overrides
from mono.sae import SparseAutoencoder, Trainer


def test_n_features_is_a_grid_axis_of_the_sweep():
    cfg = with_overrides(PRESETS["tiny"], sweep={"n_features": (64, 128, 256)})
    space = sweep.param_space(cfg)
    assert space["n_features"] == {"grid_search": [64, 128, 256]}
    assert space["l1_coeff"] == {"grid_search": list(cfg.sweep.l1_coeff)}
    assert "n_features" not in sweep.param_space(PRESETS["tiny"])   # empty: the base size
    trial = SimpleNamespace(config={"l1_coeff": 1e-3, "lr": 3e-4, "n_features": 128},
                            trial_id="ab12_00001")
    assert sweep.trial_dirname(trial) == "F_128_l1_0.001_lr_0.0003_ab12_00001"
    trial.config.pop("n_features")
    assert sweep.trial_dirname(trial) == "l1_0.001_lr_0.0003_ab12_00001"
    assert PRESETS["paper"].sweep.n_features == (512, 4096, 16_384, 32_768, 65_536, 131_072)
    for bad in ((0, 64), (64, 64)):
        with pytest.raises(ValueError, match="n_features"):
            SweepConfig(n_features=bad)


def test_sweep_job_takes_sizes_from_the_command_line():
    from mono import cli
    from ray_jobs import pipeline, sweep_sae

    cfg = cli.parse(["--preset", "tiny", "--n_features", "64", "128"], "x", "",
                    sweep_sae.SECTIONS)
    assert cfg.sweep.n_features == (64, 128) and cfg.sae.n_features == 256
    cfg = cli.parse(["--preset", "tiny", "--sweep.n_features", "64", "128"], "x", "",
                    pipeline.SECTIONS)
    assert cfg.sweep.n_features == (64, 128)


# --- matching ------------------------------------------------------------------------------


def brute_force(small, large, k):
    sims = (large @ small.T).numpy()                                         # (L, S)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(sims, order, 1), sims.argmax(0), sims.max(0)


@pytest.mark.parametrize("block", [1, 7, 64, 4096])
def test_decoder_matching_equals_brute_force(block):
    gen = torch.Generator().manual_seed(0)
    small = splitting.unit_rows(torch.randn(37, 16, generator=gen))
    large = splitting.unit_rows(torch.randn(101, 16, generator=gen))
    parents, cos, child, child_cos = splitting.decoder_matches(small, large, 3, block)
    want_p, want_cos, want_child, want_child_cos = brute_force(small, large, 3)
    np.testing.assert_allclose(cos, want_cos, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(parents, want_p)       # random directions: no ties
    np.testing.assert_array_equal(child, want_child)
    np.testing.assert_allclose(child_cos, want_child_cos, rtol=1e-5, atol=1e-6)
    assert parents.shape == (101, 3) and child.shape == (37,)


# --- a planted hierarchy ---------------------------------------------------------------------

H, N_PARENTS, N_CHILDREN, SPREAD = 32, 6, 4, 0.5


def planted_hierarchy(seed=0):
    """Parents: orthonormal directions. Children of a parent: unit(parent + 0.5 n) with n
    orthonormal noise directions (cosine 0.89 to the parent, 0.8 to a sibling, 0 across
    families). Each parent is on in 15% of examples (magnitude U(0.5, 1.5)) and then shows
    as ONE of its children, chosen uniformly: the children fire on disjoint subsets of the
    parent's inputs. A dictionary with a feature per parent reconstructs a family with one
    direction (0.8 of its variance); one with a feature per child reconstructs it exactly."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(H, H, generator=gen, dtype=torch.float64))
    parents = q[:, :N_PARENTS].T.float()                                     # (P, H)
    noise = q[:, N_PARENTS:N_PARENTS * (1 + N_CHILDREN)].T.float().view(N_PARENTS, N_CHILDREN, H)
    children = splitting.unit_rows((parents[:, None] + SPREAD * noise).view(-1, H))

    def batch(n):
        on = torch.rand(n, N_PARENTS, generator=gen) < 0.15
        pick = torch.randint(0, N_CHILDREN, (n, N_PARENTS), generator=gen)
        mag = torch.rand(n, N_PARENTS, generator=gen) + 0.5
        dirs = children[torch.arange(N_PARENTS) * N_CHILDREN + pick]          # (n, P, H)
        return ((on * mag)[..., None] * dirs).sum(1)                         # (n, H)

    return parents, children, batch


def train_sae(n_features, batch, seed, steps=1500):
    """A real SAE (mono.sae's Trainer: the training step train_sae runs) on the stream."""
    sae = SparseAutoencoder(H, n_features, 3e-3, generator=torch.Generator().manual_seed(seed))
    sae.init_b_dec_(batch(2048))
    trainer = Trainer(sae, lr=3e-3)
    for _ in range(steps):
        trainer.step(batch(512))
    return sae


def write_shards(out, batch, n_shards=2, rows=2048):
    files = []
    for i in range(n_shards):
        x = batch(rows).numpy()
        table = store.acts_table(np.arange(rows) + i * rows, np.zeros(rows), np.zeros(rows), x,
                                 "float32")
        name = store.acts_shard_name(i * rows)
        store.write_acts_shard(store.join(store.Layout(out).acts, name), table, "none", 512)
        files.append({"name": name, "rows": rows})
    store.write_json(store.Layout(out).acts_manifest, {"files": files, "dtype": "float32",
                                                       "H": H, "row_group_rows": 512,
                                                       "rows": n_shards * rows})


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    torch.set_num_threads(1)
    parents, children, batch = planted_hierarchy()
    small, large = train_sae(8, batch, 1), train_sae(32, batch, 2)
    out = str(tmp_path_factory.mktemp("planted"))
    write_shards(out, batch)
    return parents, children, small, large, out


def test_small_dictionary_learns_parents_large_one_children(planted):
    parents, children, small, large, _ = planted
    assert (parents @ small.W_dec.detach().T).max(1).values.min() > 0.9
    assert (children @ large.W_dec.detach().T).max(1).values.min() > 0.9
    # the children are not in the small dictionary, but for what its 2 spare features took:
    # each child's best there is its parent's direction (cosine 0.89)
    assert ((children @ small.W_dec.detach().T).max(1).values > 0.95).sum() <= 2


def test_matching_recovers_the_planted_parent_children_map(planted, ray_local):
    parents, children, small, large, out = planted
    cfg = with_overrides(PRESETS["tiny"], out=out, splitting={
        "map_method": "pca", "sample_rows": 4096, "n_tasks": 2, "block": 5})
    cols = splitting.match(cfg, [small, large])["columns"]
    size = np.array(cols["size"])
    at = {s: np.flatnonzero(size == s) for s in (0, 1)}                      # rows per size

    def col(name, s):
        return [cols[name][i] for i in at[s]]

    small_of = (parents @ small.W_dec.detach().T).argmax(1).numpy()          # parent -> S
    planted_of_small = (small.W_dec.detach() @ parents.T).argmax(1).numpy()  # S -> parent
    large_of = (children @ large.W_dec.detach().T).argmax(1).numpy()         # child -> L
    family = {s: np.array(col("family", s)) for s in (0, 1)}
    for c, feat in enumerate(large_of):
        p = c // N_CHILDREN
        parent, cos = col("parent", 1)[feat], col("parent_cos", 1)[feat]
        assert planted_of_small[parent] == p and cos > 0.8                   # its parent
        assert feat in col("children", 0)[small_of[p]]                       # and back
        assert family[1][feat] == family[0][small_of[p]] >= 0
        # activation correlation: the best candidate is of its family, other families ~0
        cands, corr = col("parents", 1)[feat], col("parents_corr", 1)[feat]
        assert planted_of_small[cands[int(np.argmax(corr))]] == p and max(corr) > 0.2
        assert all(r < 0.1 for q, r in zip(cands, corr) if planted_of_small[q] != p)
    fams = [family[0][small_of[p]] for p in range(N_PARENTS)]
    assert len(set(fams)) == N_PARENTS                                       # no family merged
    for p in range(N_PARENTS):
        assert col("split_factor", 0)[small_of[p]] >= N_CHILDREN - 1
    summary = splitting.size_summary([8, 32], cols)
    assert summary[1]["matched"] >= N_PARENTS * N_CHILDREN               # every child's
    assert sum(summary[0]["split_factors"].values()) == summary[0]["alive"]


# --- the stage ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_job_matches_the_sizes_of_a_sweep_and_writes_the_pages(ray_local, tmp_path, capsys):

    from test_sweep import argv, make_run

    from mono.errors import UserError
    from ray_jobs import splitting as job
    from ray_jobs import sweep_sae

    out = make_run(str(tmp_path / "run"))
    sweep_sae.main(argv(out, "sizes", "--n_features", "32", "64", "128", "--l1_coeff", "1e-3"))
    summary = job.main(["--preset", "tiny", "--out", out, "--name", "sizes",
                        "--sample_rows", "2048"])
    assert [t["n_features"] for t in summary["trials"]] == [32, 64, 128]
    assert [t["name"][:5] for t in summary["trials"]] == ["F_32_", "F_64_", "F_128"]
    root = store.Layout(out).splitting
    table = store.read_table(store.join(root, "matches.parquet"))
    assert table.num_rows == 32 + 64 + 128
    assert np.isfinite(table.column("x").to_numpy()).all()            # the UMAP map
    assert 0 <= summary["sizes"][1]["matched_fraction"] <= 1
    for t in summary["trials"]:                                        # analysed, linked
        page = store.join(t["analysis"], "html", "features", "0.html")
        assert 'class="split"' in store.read_bytes(page).decode()
    assert summary["index"] == store.join(root, "html", "index.html")
    assert store.exists(store.join(root, "html", "map.html"))
    printed = capsys.readouterr().out
    assert "splitting: 3 sizes" in printed and summary["index"] in printed
    with pytest.raises(UserError, match="nope"):
        job.main(["--preset", "tiny", "--out", out, "--name", "sizes", "--trials", "nope"])
    with pytest.raises(UserError, match="no .*trials.json"):
        job.main(["--preset", "tiny", "--out", out, "--name", "other"])
