"""The sweep's ResamplePool (mono.resample): uniform draws from every shard, fresh rows per
call, and a Ray actor that survives being killed.

Shards are synthetic (store.acts_table, float32) with unequal sizes; every row's activation
vector holds its global row id, so a served row can be traced back to its shard and row.
"""

import time

import numpy as np
import pytest

from mono import resample, store

SIZES = (256, 768, 1536)   # rows per shard: shares 0.1, 0.3, 0.6
GROUP = 64                 # rows per Parquet row group
H = 8


def write_shards(d, sizes=SIZES, dtype="float32") -> list[str]:
    """Shards whose acts[:, j] all equal the row's global id (exact in float32 < 2^24)."""
    files, first = [], 0
    for i, n in enumerate(sizes):
        ids = np.arange(first, first + n)
        acts = np.repeat(ids[:, None], H, axis=1).astype(np.float32)
        if dtype == "bfloat16":  # stored as the top 16 bits (exact for ids < 256)
            acts = (acts.view(np.uint32) >> 16).astype(np.uint16)
        acts = acts.astype(store.ACTS_STORAGE[dtype])
        table = store.acts_table(ids, np.zeros(n), np.zeros(n), acts, dtype)
        path = str(d / f"part-{i:09d}.parquet")
        store.write_acts_shard(path, table, "zstd", GROUP)
        files.append(path)
        first += n
    return files


def test_row_groups_cover_every_row(tmp_path):
    groups = resample.row_groups(write_shards(tmp_path))
    assert groups.H == H and len(groups.files) == 3
    assert groups.size.sum() == sum(SIZES) and set(groups.size) == {GROUP}
    assert np.array_equal(groups.first, np.arange(0, sum(SIZES), GROUP))
    assert np.bincount(groups.shard).tolist() == [s // GROUP for s in SIZES]


def test_draws_are_uniform_and_come_from_every_shard(tmp_path):
    groups = resample.row_groups(write_shards(tmp_path))
    rng = np.random.default_rng(0)
    total, n = sum(SIZES), 320
    per_shard, per_row = np.zeros(3), np.zeros(total)
    for _ in range(40):
        rows = resample.draw_rows(groups, n, rng, rows_per_group=16)
        assert len(np.unique(rows["row"])) == n                       # distinct rows
        assert np.array_equal(rows["acts"][:, 0], rows["row"])        # the row read is the row
        assert np.array_equal(rows["shard"], np.searchsorted(np.cumsum(SIZES), rows["row"],
                                                             side="right"))
        per_shard += np.bincount(rows["shard"], minlength=3)
        per_row[rows["row"]] += 1
    share = per_shard / per_shard.sum()
    np.testing.assert_allclose(share, np.array(SIZES) / total, atol=0.04)
    # every row equally likely: the first and second half of each shard are drawn alike
    halves = [per_row[s:s + k // 2].sum() / per_row[s + k // 2:s + k].sum()
              for s, k in zip(np.cumsum((0,) + SIZES[:-1]), SIZES)]
    assert all(0.7 < h < 1.4 for h in halves), halves


def test_draw_reads_few_row_groups(tmp_path, monkeypatch):
    groups = resample.row_groups(write_shards(tmp_path))
    reads = []
    real = resample._read_rows
    monkeypatch.setattr(resample, "_read_rows", lambda g, i, r: reads.append(i) or real(g, i, r))
    resample.draw_rows(groups, 160, np.random.default_rng(1), rows_per_group=32)
    # 160 rows at 32 per group: ~5.5 of the 40 groups, not the ~35 a row-by-row draw touches
    assert 2 <= len(reads) <= 14


def test_draw_everything_and_bad_sizes(tmp_path):
    groups = resample.row_groups(write_shards(tmp_path, sizes=(100, 30)))
    rows = resample.draw_rows(groups, 130, np.random.default_rng(0))
    assert sorted(rows["row"]) == list(range(130))
    for bad in (0, 131):
        with pytest.raises(ValueError, match="can draw 1..130 rows"):
            resample.draw_rows(groups, bad, np.random.default_rng(0))


def test_pool_serves_each_row_once_and_refills(tmp_path):
    pool = resample.ResamplePool(write_shards(tmp_path), pool_rows=512, rows_per_group=16)
    assert pool.ready()["fresh"] == 512 and pool.stats()["drawn"] == 512
    first = pool.draw(512)
    assert pool.stats()["fresh"] < 512              # served rows left the pool
    second = pool.draw(512)                         # waits for the refill
    assert pool.stats()["drawn"] >= 1024 and pool.stats()["served"] == 1024
    assert np.array_equal(first["acts"][:, 0], first["row"])
    assert not np.array_equal(np.sort(first["row"]), np.sort(second["row"]))
    x = pool.sample(100)
    assert x.shape == (100, H) and x.dtype == np.float32
    big = pool.sample(600)                          # more than the pool: drawn directly
    assert big.shape == (600, H) and pool.stats()["direct"] == 600
    assert len(np.unique(big[:, 0])) == 600
    with pytest.raises(ValueError, match="positive row count"):
        pool.sample(0)


@pytest.mark.parametrize("dtype,served", [("float16", np.float16), ("bfloat16", np.float32)])
def test_pool_holds_at_most_the_dataset_and_serves_float(tmp_path, dtype, served):
    pool = resample.ResamplePool(write_shards(tmp_path, sizes=(64, 64), dtype=dtype),
                                 pool_rows=1000)
    assert pool.ready()["capacity"] == 128
    x = pool.sample(128)
    assert x.dtype == served and sorted(x[:, 0].astype(int)) == list(range(128))


def test_pool_actor_is_shared_restarted_and_serves_through_the_client(tmp_path, ray_local):
    ray = ray_local
    files = write_shards(tmp_path)
    name = resample.pool_name(str(tmp_path / "sweep" / "exp"))
    assert name.startswith("resample-pool-exp-")
    handle = resample.start_pool(files, name, pool_rows=256, rows_per_group=16)
    try:
        client = resample.PoolClient(handle)
        x = client.sample(200)
        assert x.shape == (200, H) and x.dtype == np.float32 and x.flags.writeable
        pid = ray.get(handle.stats.remote())["pid"]
        again = resample.start_pool(files, name, pool_rows=256)   # get_if_exists: the same
        assert ray.get(again.stats.remote())["pid"] == pid
        with pytest.raises(ValueError, match="already serves"):
            resample.start_pool(files[:1], name, pool_rows=256)
        ray.kill(handle, no_restart=False)                        # Ray restarts it ...
        y = client.sample(200)                                    # ... and retries the call
        assert y.shape == (200, H)
        deadline = time.monotonic() + 120
        while ray.get(handle.stats.remote())["pid"] == pid:
            assert time.monotonic() < deadline, "the killed pool was not restarted"
            time.sleep(0.5)
        assert client.sample(200).shape == (200, H)               # a new process, refilled
        assert ray.get(handle.stats.remote())["served"] >= 200
        got = ray.get(handle.draw.remote(256))
        assert set(np.unique(got["shard"])) == {0, 1, 2}
    finally:
        ray.kill(handle, no_restart=True)
