"""The sweep's ResampleService (mono.resample): uniform draws from every shard, one draw per
resample step seeded by (seed, step) and shared by every trial, a Ray actor that survives
being killed and serves the same draw again.

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


def test_a_draw_is_seeded_by_seed_and_step_computed_once_and_held_for_keep_steps(tmp_path):
    files = write_shards(tmp_path)
    service = resample.ResampleService(files, seed=3, steps=(8, 16, 24), n=200,
                                       rows_per_group=16, keep=2)
    (a,) = service.draw(8, 200)
    (b,) = service.draw(8, 200)           # a second trial: the very same array, not a copy
    assert b is a and a.shape == (200, H) and len(np.unique(a[:, 0])) == 200
    stats = service.stats()
    assert stats["served_per_step"] == {8: 2}
    (c,) = service.draw(16, 200)          # prefetched after step 8 was served
    assert not np.array_equal(np.sort(a[:, 0]), np.sort(c[:, 0]))
    service.draw(24, 200)
    assert service.stats()["computed"] == 3 and len(service.stats()["held"]) <= 3
    # a restarted service (or a retried trial asking again) gets the same rows
    again = resample.ResampleService(files, seed=3, rows_per_group=16)
    assert np.array_equal(again.draw(8, 200)[0], a)
    other = resample.ResampleService(files, seed=4, rows_per_group=16)
    assert not np.array_equal(other.draw(8, 200)[0], a)
    with pytest.raises(ValueError, match="positive row count"):
        service.draw(8, 0)
    with pytest.raises(ValueError, match="draw of 9999 rows from 2560 rows"):
        service.draw(8, 9999)


@pytest.mark.parametrize("dtype,served", [("float16", np.float16), ("bfloat16", np.float32)])
def test_draws_are_stored_float16_or_decoded_to_float32(tmp_path, dtype, served):
    service = resample.ResampleService(write_shards(tmp_path, sizes=(64, 64), dtype=dtype), 0)
    (x,) = service.draw(1, 128)
    assert x.dtype == served and sorted(x[:, 0].astype(int)) == list(range(128))


def test_every_trial_gets_the_one_stored_draw_and_a_restart_serves_it_again(tmp_path,
                                                                            ray_local):
    ray = ray_local
    files = write_shards(tmp_path)
    name = resample.service_name(str(tmp_path / "sweep" / "exp"))
    assert name.startswith("resample-exp-")
    handle = resample.start_service(files, name, seed=0, steps=(8, 16), n=300, H=H,
                                    rows_per_group=16)
    try:
        trials = [resample.SharedDraw(handle) for _ in range(3)]   # what Tune ships each trial
        draws = [resample.source_at(t, 8).sample(300) for t in trials]
        assert all(np.array_equal(d, draws[0]) for d in draws)
        assert draws[0].shape == (300, H) and not draws[0].flags.writeable   # shared, zero-copy
        refs = [ray.get(handle.draw.remote(8, 300))[0] for _ in range(2)]
        assert refs[0] == refs[1]                                    # put once, one object
        stats = ray.get(handle.stats.remote())
        assert stats["served_per_step"] == {8: 5} and stats["computed"] <= 2   # 8 (+ 16 ahead)
        pid = stats["pid"]
        again = resample.start_service(files, name, seed=0, steps=(8, 16), n=300, H=H)
        assert ray.get(again.stats.remote())["pid"] == pid           # get_if_exists: the same
        with pytest.raises(ValueError, match="already serves"):
            resample.start_service(files[:1], name, seed=0, steps=(), n=300, H=H)
        ray.kill(handle, no_restart=False)                           # Ray restarts it ...
        retried = resample.source_at(trials[0], 8).sample(300)       # ... a retried trial
        assert np.array_equal(retried, draws[0])                     # gets the same draw
        deadline = time.monotonic() + 120
        while ray.get(handle.stats.remote())["pid"] == pid:
            assert time.monotonic() < deadline, "the killed service was not restarted"
            time.sleep(0.5)
        assert np.array_equal(resample.source_at(trials[1], 8).sample(300), draws[0])
    finally:
        ray.kill(handle, no_restart=True)
