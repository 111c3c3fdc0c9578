"""Stage 2: LM training (mono.train_lm) on synthetic token shards, plain torch and Ray Train.

The shards are written here in the stage-1 format (store.token_table + manifest), holding
a noisy cycle over a few token ids that the LM learns within a few steps, so these tests do
not depend on the tokenizer.
"""

import dataclasses
import logging
import math

import numpy as np
import pytest
import torch

from mono import store, train_lm
from mono.config import PRESETS, Config, LmConfig, TrainLmConfig, with_overrides
from mono.errors import UserError


def write_tokens(out: str, ctx_len: int = 64, rows: tuple[int, int] = (96, 8), n_sym: int = 16,
                 noise: float = 0.05, seed: int = 0, rows_per_file: int = 40) -> np.ndarray:
    """Token shards + manifest as tokens.py writes them: each split one stream cut into
    consecutive windows. The stream steps through a cycle of n_sym ids, with a random jump
    with probability `noise`. Returns the train rows (N, T)."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(50000)[:n_sym] + 100
    splits = {}
    for split, n in zip(("train", "val"), rows):
        steps = np.where(rng.random(n * ctx_len) < noise, rng.integers(1, n_sym, n * ctx_len), 1)
        toks = ids[np.cumsum(steps) % n_sym].reshape(n, ctx_len)                 # (N, T)
        files = []
        for first in range(0, n, rows_per_file):
            k = min(rows_per_file, n - first)
            name = f"part-{len(files):05d}.parquet"
            store.write_table_atomic(
                store.join(store.Layout(out).tokens(split), name),
                store.token_table(np.arange(first, first + k), toks[first:first + k]))
            files.append({"name": name, "first": first, "rows": k})
        splits[split] = {"rows": n, "tokens": n * ctx_len, "files": files, "toks": toks}
    store.write_json(store.Layout(out).tokens_manifest, {
        "tokenizer": "synthetic", "ctx_len": ctx_len, "dtype": "uint16",
        "rows": {s: v["rows"] for s, v in splits.items()},
        "splits": {s: {k: v for k, v in d.items() if k != "toks"} for s, d in splits.items()}})
    return splits["train"]["toks"]


def tiny_cfg(out, **train) -> Config:
    """The tiny preset, made cheaper still: 4 contexts of 64 tokens per step."""
    base = dict(max_iters=12, batch_size=4, eval_interval=6, log_interval=4, eval_iters=2)
    return with_overrides(PRESETS["tiny"], out=str(out), train_lm={**base, **train})


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MONO_CACHE_DIR", str(tmp_path / "cache"))


def test_lr_schedule_is_nanogpts():
    tc = TrainLmConfig(max_iters=100, warmup_iters=10, lr=1e-3, min_lr=1e-4)
    lrs = [train_lm.get_lr(s, tc) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-3 / 11) and lrs[9] == pytest.approx(1e-3 * 10 / 11)
    assert lrs[10] == pytest.approx(1e-3)                                  # peak after warmup
    assert lrs[55] == pytest.approx(1e-4 + 0.5 * 9e-4)                     # cosine midpoint
    assert lrs[100] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert train_lm.get_lr(5, TrainLmConfig(max_iters=5, warmup_iters=5)) == pytest.approx(6e-5)


def test_optimizer_decays_matrices_only():
    from mono.lm import Lm

    m = Lm(PRESETS["tiny"].lm)
    opt = train_lm.make_optimizer(m, PRESETS["tiny"].train_lm, torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1
                                                              for p in no_decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == m.num_params(False)
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_unigram_baselines_by_hand():
    train = np.array([[1, 1, 2, 3]])
    val = np.array([[9, 1, 1], [2, 2, 2]], dtype=np.uint16)
    targets = train_lm.val_targets(val, [np.array([0, 1])])  # the last row's last: ignored
    assert targets.tolist() == [1, 1, 2, 2, 2]
    got = train_lm.unigram_baselines(train, targets, vocab_size=50304)
    p = np.array([2, 3]) / 5
    assert got["unigram_entropy"] == pytest.approx(-(p * np.log(p)).sum())
    q1, q2 = 3 / (4 + 50304), 2 / (4 + 50304)
    assert got["unigram_xent"] == pytest.approx(-(2 * np.log(q1) + 3 * np.log(q2)) / 5)


def test_windows_take_the_last_target_from_the_next_row():
    rows = np.arange(12, dtype=np.uint16).reshape(3, 4)
    x, y = train_lm.windows(rows, np.array([0, 2, 1]), torch.device("cpu"))
    assert x.tolist() == [[0, 1, 2, 3], [8, 9, 10, 11], [4, 5, 6, 7]]
    assert y.tolist() == [[1, 2, 3, 4], [9, 10, 11, -1], [5, 6, 7, 8]]
    tc = TrainLmConfig(batch_size=5, grad_accum=2)
    a = train_lm.batch_rows(0, 7, 0, 100, tc)
    assert a.shape == (2, 5) and np.array_equal(a, train_lm.batch_rows(0, 7, 0, 100, tc))
    assert not np.array_equal(a, train_lm.batch_rows(0, 8, 0, 100, tc))
    assert not np.array_equal(a, train_lm.batch_rows(0, 7, 1, 100, tc))   # DDP ranks differ


def test_train_writes_a_checkpoint_and_loss_goes_down(tmp_path, caplog):
    toks = write_tokens(str(tmp_path))
    cfg = tiny_cfg(tmp_path)
    caplog.set_level(logging.INFO, logger="mono.train_lm")
    m = train_lm.train(cfg)
    assert m["step"] == 12 and [h["step"] for h in m["history"]] == [6, 12]
    assert m["history"][1]["val_loss"] < m["history"][0]["val_loss"] < math.log(50304)
    assert m["tokens"] == 12 * 4 * 64 and 0 < m["unigram_entropy"] < math.log(16) + 1e-9
    text = caplog.text
    assert "val unigram entropy" in text and "step 4/12 | loss" in text and "tokens/s" in text
    lm_dir = store.Layout(cfg.out).lm
    assert store.read_lm_metrics(cfg.out)["val_loss"] == m["val_loss"]
    assert Config.load(f"{lm_dir}/cfg.json") == cfg
    state = store.load_train_state(lm_dir)
    assert state["step"] == 12 and set(state) >= {"model", "optimizer", "torch_rng"}
    # the stored model scores the val split as training reported
    lm = store.load_lm(cfg.out, expect=cfg.lm)
    val = train_lm.cached_split(cfg.out, "val")
    loss = train_lm.evaluate(lm, val, train_lm.val_rows(cfg.seed, len(val), cfg.train_lm),
                             torch.device("cpu"), None)
    assert loss == pytest.approx(m["val_loss"], rel=1e-6)
    assert np.array_equal(train_lm.cached_split(cfg.out, "train"), toks)


class Killed(Exception):
    pass


def test_resumed_training_ends_with_the_same_weights(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    for out in (full, cut):
        write_tokens(str(out))
    m_full = train_lm.train(tiny_cfg(full))

    def kill_at_8(m):
        if m["step"] == 8:  # after the checkpoint at 6: steps 7-8 are lost, as in a crash
            raise Killed

    with pytest.raises(Killed):
        train_lm.train(tiny_cfg(cut), on_log=kill_at_8)
    assert store.load_train_state(store.Layout(str(cut)).lm)["step"] == 6
    m_cut = train_lm.train(tiny_cfg(cut))
    assert m_cut["history"] == [{**h, "elapsed_s": m_cut["history"][i]["elapsed_s"]}
                                for i, h in enumerate(m_full["history"])]
    a, b = store.load_lm(str(full)), store.load_lm(str(cut))
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    sa = store.load_train_state(store.Layout(str(full)).lm)["optimizer"]["state"]
    sb = store.load_train_state(store.Layout(str(cut)).lm)["optimizer"]["state"]
    assert all(torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"]) for k in sa)
    # a finished run reruns as a no-op
    assert train_lm.train(tiny_cfg(cut))["val_loss"] == m_cut["val_loss"]


def test_bad_inputs_raise_before_training(tmp_path):
    cfg = tiny_cfg(tmp_path)
    with pytest.raises(FileNotFoundError, match="no token manifest"):
        train_lm.check_inputs(cfg)
    write_tokens(cfg.out)
    train_lm.train(tiny_cfg(tmp_path, max_iters=6))
    wider = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, d_model=64, n_head=2))
    with pytest.raises(ValueError, match=r"does not match the requested LmConfig: d_model=32 "
                                         r"\(asked 64\)"):
        train_lm.check_inputs(wider)
    with pytest.raises(ValueError, match="does not match the requested LmConfig"):
        train_lm.train(wider)                                   # resuming refuses it too
    short = with_overrides(cfg, lm={"block_size": 32}, tokens={"ctx_len": 32})
    with pytest.raises(ValueError, match="contexts of 64 tokens, longer than "
                                         "lm.block_size=32"):
        train_lm.check_inputs(short)
    with pytest.raises(ValueError, match="betas must be < 1"):
        TrainLmConfig(beta2=1.0)


def test_autocast_dtype_choices():
    cpu = torch.device("cpu")
    assert train_lm.autocast_dtype("auto", cpu) is None
    assert train_lm.autocast_dtype("float32", cpu) is None
    assert train_lm.autocast_dtype("bfloat16", cpu) is torch.bfloat16


def test_run_with_zero_workers_trains_in_process(tmp_path):
    """num_workers = 0 (the tiny preset): run() is train() in this process, no Ray Train."""
    write_tokens(str(tmp_path))
    m = train_lm.run(tiny_cfg(tmp_path, num_workers=0, max_iters=6, eval_interval=3))
    assert m["step"] == 6 and [h["step"] for h in m["history"]] == [3, 6]
    assert not (tmp_path / "lm" / "ray").exists()
    assert store.load_lm(str(tmp_path)).num_params() > 0
    with pytest.raises(ValueError, match="num_workers"):
        TrainLmConfig(num_workers=-1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this process has a GPU to train on")
def test_use_gpu_in_this_process_without_cuda_is_refused(tmp_path):
    """num_workers 0 trains on the caller's device: without CUDA that is an error at once
    (a job's driver sits on a CPU worker), not a CUDA crash after the LM is built."""
    write_tokens(str(tmp_path))
    cfg = tiny_cfg(tmp_path, num_workers=0, use_gpu=True)
    with pytest.raises(UserError, match="num_workers 1"):
        train_lm.check(cfg)
    assert not (tmp_path / "lm").exists()


@pytest.mark.slow
def test_ray_train_ddp_two_workers_and_the_job(tmp_path, ray_local, capsys):
    from ray_jobs import train_lm as job

    write_tokens(str(tmp_path))
    args = ["--preset", "tiny", "--out", str(tmp_path), "--num_workers", "2", "--max_iters",
            "6", "--batch_size", "4", "--eval_interval", "3", "--eval_iters", "2",
            "--max_failures", "0"]
    m = job.main(args)
    assert m["step"] == 6 and [h["step"] for h in m["history"]] == [3, 6]
    assert "LM: val loss" in capsys.readouterr().out
    assert m["tokens"] == 6 * 2 * 4 * 64                    # 2 ranks x 4 contexts per step
    lm = store.load_lm(str(tmp_path), expect=LmConfig(d_model=32, n_head=2, d_mlp=128,
                                                       block_size=64))
    assert lm.num_params() > 0
    ray_ckpts = list((tmp_path / "lm" / "ray" / "train_lm").glob("step_*"))
    assert sorted(p.name for p in ray_ckpts) == ["step_00000003", "step_00000006"]
    # a rerun restores Ray's latest checkpoint (ray.train.get_checkpoint): with <out>/lm's
    # own files gone it trains nothing and rewrites them with the same history
    for name in ("train_state.pt", "metrics.json", "model.safetensors"):
        (tmp_path / "lm" / name).unlink()
    assert job.main(args)["history"] == m["history"]       # elapsed times too: no retraining
    assert torch.equal(store.load_lm(str(tmp_path)).lm_head.weight, lm.lm_head.weight)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_training_and_cpu_reload(tmp_path):
    write_tokens(str(tmp_path))
    cfg = tiny_cfg(tmp_path, dtype="auto", use_gpu=True)
    assert train_lm.autocast_dtype("auto", torch.device("cuda")) is torch.bfloat16
    m = train_lm.train(cfg, device=torch.device("cuda"))
    assert m["history"][1]["val_loss"] < m["history"][0]["val_loss"]
    lm = store.load_lm(cfg.out, expect=cfg.lm)                 # saved from CUDA, loads on CPU
    assert lm.lm_head.weight.device.type == "cpu"
