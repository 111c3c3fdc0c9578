"""Reading activation shards back: ActsReader (SAE training stream), LocalShardSource
(resampling draws) and read_dataset (Ray Data).

Most tests use synthetic float32 shards whose first activation is the row's global id, so
coverage and order are exact to check; a few use real shards from the Collector.
"""

import numpy as np
import pytest
import torch
from test_acts import make_run

from mono import acts, store
from mono.reader import ActsReader, LocalShardSource, read_dataset

H = 4
RG = 64  # row-group rows


def synthetic(tmp_path, rows=(300, 300, 257, 300, 64, 300, 123), dtype="float32") -> tuple:
    """Shards part-*.parquet with acts[:, 0] = global row id; returns (dir, total rows)."""
    d = tmp_path / "acts"
    start = 0
    for i, n in enumerate(rows):
        ids = np.arange(start, start + n)
        x = np.zeros((n, H), np.float32)
        x[:, 0], x[:, 1] = ids, i
        stored = x if dtype == "float32" else x.astype(np.float16)
        table = store.acts_table(ids // 10, ids % 10, ids % 50257, stored, dtype)
        store.write_acts_shard(str(d / store.acts_shard_name(start)), table, "zstd", RG)
        start += n
    return str(d), start


def ids(batches) -> np.ndarray:
    return np.concatenate([b[:, 0].numpy() for b in batches]).astype(np.int64)


def test_batches_shape_dtype_and_one_pass_covers_every_row_once(tmp_path):
    d, total = synthetic(tmp_path)
    reader = ActsReader(d, 100, seed=1, shuffle_buffer=4 * RG, drop_last=False)
    assert reader.mix == 4 and len(reader) == -(-total // 100)
    batches = list(reader)
    assert all(b.dtype == torch.float32 and b.shape[1] == H for b in batches)
    assert [len(b) for b in batches] == [100] * (total // 100) + [total % 100]
    got = ids(batches)
    np.testing.assert_array_equal(np.sort(got), np.arange(total))  # every row exactly once
    assert not np.array_equal(got, np.arange(total))                # and shuffled
    assert reader.state()["rows"] == total
    dropped = list(ActsReader(d, 100, seed=1, shuffle_buffer=4 * RG))
    assert len(dropped) == total // 100
    np.testing.assert_array_equal(ids(dropped), got[:len(dropped) * 100])


def test_batches_mix_several_shards(tmp_path):
    d, _ = synthetic(tmp_path)
    first = next(iter(ActsReader(d, 128, seed=0, shuffle_buffer=4 * RG)))
    assert len(np.unique(first[:, 1].numpy())) >= 3  # rows of >= 3 shards in one batch


def test_deterministic_given_seed(tmp_path):
    d, _ = synthetic(tmp_path)
    a = ids(ActsReader(d, 64, seed=3, shuffle_buffer=2 * RG))
    b = ids(ActsReader(d, 64, seed=3, shuffle_buffer=2 * RG))
    c = ids(ActsReader(d, 64, seed=4, shuffle_buffer=2 * RG))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("stop", [1, 5, 11, 20, 29])
def test_resume_from_state_continues_exactly(tmp_path, stop):
    d, _ = synthetic(tmp_path)
    kw = dict(seed=7, shuffle_buffer=3 * RG, epochs=2)
    full = ids(ActsReader(d, 57, **kw))  # two epochs; 29 stops in the second
    reader = ActsReader(d, 57, **kw)
    it = iter(reader)
    head = [next(it) for _ in range(stop)]
    state = reader.state()
    del it
    rest = list(ActsReader(d, 57, state=state, **kw))
    np.testing.assert_array_equal(ids(head + rest), full)
    with pytest.raises(ValueError, match="does not match"):
        ActsReader(d, 57, seed=8, state=state)


def test_row_budget_and_epochs(tmp_path):
    d, total = synthetic(tmp_path)
    assert len(list(ActsReader(d, 50, max_rows=420))) == 8
    two = ids(ActsReader(d, 50, epochs=2, drop_last=False))
    np.testing.assert_array_equal(np.bincount(two), np.full(total, 2))
    assert not np.array_equal(two[:total], two[total:])  # each epoch has its own order
    endless = iter(ActsReader(d, 50, epochs=0))
    assert len([next(endless) for _ in range(3 * total // 50)]) == 3 * total // 50


def test_with_meta_and_file_uri(tmp_path):
    d, total = synthetic(tmp_path, dtype="float16")
    reader = ActsReader("file://" + d, 128, with_meta=True, drop_last=False)
    x, meta = next(iter(reader))
    got = x[:, 0].numpy().astype(np.int64)  # fp16 holds integers < 2048 exactly
    np.testing.assert_array_equal(meta["ctx"], got // 10)
    np.testing.assert_array_equal(meta["pos"], got % 10)


def test_reader_decodes_real_shards(tmp_path):
    for dtype in ("float16", "bfloat16"):
        cfg, _, _ = make_run(tmp_path / dtype, dtype=dtype)
        _, settings, _ = acts.check_inputs(cfg)
        collector = acts.Collector(cfg.out, settings)
        for first, n in acts.plan(200, 64):
            collector.collect(first, n)
        store.write_json(store.Layout(cfg.out).acts_manifest,
                         acts._manifest(cfg, settings, store.tokens_manifest(cfg.out),
                                        acts.plan(200, 64)))
        tables = [store.read_table(f) for f in store.acts_files(cfg.out)]
        expect = {}
        for t in tables:
            ctx, pos, _, x = store.table_acts(t, float32=True)
            expect |= {(c, p): row for c, p, row in zip(ctx, pos, x)}
        n = 0
        for x, meta in ActsReader(cfg.out, 256, with_meta=True, drop_last=False):
            for row, c, p in zip(x.numpy(), meta["ctx"], meta["pos"]):
                np.testing.assert_array_equal(row, expect[(c, p)])
                n += 1
        assert n == len(expect) == 200 * 16


def test_local_shard_source(tmp_path):
    d, total = synthetic(tmp_path)
    src = LocalShardSource(d, seed=0)
    a = src.sample(500)
    assert a.shape == (500, H) and a.dtype == np.float32
    got = a[:, 0].astype(np.int64)
    assert len(np.unique(got)) == 500 and got.min() >= 0 and got.max() < total
    np.testing.assert_array_equal(a[:, 1], np.searchsorted(
        np.cumsum([300, 300, 257, 300, 64, 300, 123]), got, side="right"))  # the right rows
    assert not np.array_equal(src.sample(500), a)           # a fresh draw per call
    np.testing.assert_array_equal(LocalShardSource(d, seed=0).sample(500), a)
    np.testing.assert_array_equal(src.sample(50, seed=9), src.sample(50, seed=9))
    assert np.abs(np.mean(src.sample(total)[:, 0]) - (total - 1) / 2) < 1e-6  # all rows
    with pytest.raises(ValueError, match="sample size"):
        src.sample(total + 1)


def test_read_dataset(ray_local, tmp_path):
    d, total = synthetic(tmp_path, dtype="float16")
    ds = read_dataset(d)
    batch = ds.take_batch(total, batch_format="numpy")
    assert batch["acts"].shape == (total, H) and batch["acts"].dtype == np.float16
    np.testing.assert_array_equal(np.sort(batch["acts"][:, 0].astype(np.int64)),
                                  np.arange(total))


def test_remote_shards_are_cached_once_per_node_unless_they_do_not_fit(tmp_path, monkeypatch,
                                                                       caplog):
    import collections
    import os

    from mono import reader

    d, _ = synthetic(tmp_path)
    uri = "file://" + d    # a pyarrow filesystem URI, as s3:// is
    monkeypatch.setenv("MONO_CACHE_DIR", str(tmp_path / "cache"))
    local = reader.local_shards(uri)
    assert local and all(p.startswith(str(tmp_path / "cache")) for p in local)
    remote = sorted(str(p) for p in (tmp_path / "acts").iterdir())
    assert [open(p, "rb").read() for p in local] == [open(p, "rb").read() for p in remote]
    mtimes = [os.path.getmtime(p) for p in local]
    assert reader.local_shards(uri) == local                   # another trial of the node:
    assert [os.path.getmtime(p) for p in local] == mtimes      # nothing fetched again
    np.testing.assert_array_equal(ids(ActsReader(local, 100, seed=1, shuffle_buffer=4 * RG)),
                                  ids(ActsReader(uri, 100, seed=1, shuffle_buffer=4 * RG)))
    assert reader.local_shards(d) is None                      # local shards: read in place
    monkeypatch.setenv("MONO_CACHE_DIR", str(tmp_path / "small"))
    monkeypatch.setattr(reader.shutil, "disk_usage",
                        lambda p: collections.namedtuple("U", "free")(1000))
    with caplog.at_level("WARNING", logger="mono.reader"):
        assert reader.local_shards(uri) is None
    assert "do not fit" in caplog.text and "streaming them" in caplog.text
