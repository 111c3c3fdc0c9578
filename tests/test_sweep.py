"""Stage 4: the Tune sweep (mono.sweep, ray_jobs.sweep_sae) around the real train_sae.

One module fixture builds a tiny run once: synthetic token shards (train + val), the tiny LM
trained for a few steps (plain torch), activation shards through `mono.acts.run`. Each test
then sweeps into its own experiment name under that run. Batch 128 over 4096 rows gives 32
steps; evals (and checkpoints) every 16 steps, at 16 and 32.
"""

import json
import os
import threading
import time

import numpy as np
import pytest

from mono import pages, resample, store, train_lm
from mono.acts import run as collect
from mono.config import PRESETS, with_overrides
from mono.errors import BadOutput, MissingInput, UserError
from mono.trial import HEADLINE
from ray_jobs import sweep_sae

T, N_TRAIN, N_VAL = 64, 256, 8


def write_tokens(out: str, seed: int = 0) -> None:
    """Stage-1 token shards: a noisy cycle over 16 ids (an LM learns it in a few steps)."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(50000)[:16] + 100
    splits = {}
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        steps = np.where(rng.random(n * T) < 0.05, rng.integers(1, 16, n * T), 1)
        toks = ids[np.cumsum(steps) % 16].reshape(n, T)
        path = store.join(store.Layout(out).tokens(split), "part-00000.parquet")
        store.write_table_atomic(path, store.token_table(np.arange(n), toks))
        splits[split] = {"rows": n, "tokens": n * T,
                         "files": [{"name": "part-00000.parquet", "first": 0, "rows": n}]}
    store.write_json(store.Layout(out).tokens_manifest, {
        "tokenizer": "synthetic", "ctx_len": T, "dtype": "uint16", "tokens_sha256": "synthetic",
        "rows": {s: v["rows"] for s, v in splits.items()}, "splits": splits})


def make_run(out: str) -> str:
    """Token shards, a tiny LM and its activation shards in `out`: what a sweep reads."""
    os.environ.setdefault("MONO_CACHE_DIR", os.path.join(out, "cache"))
    write_tokens(out)
    # A few LM steps make the MLP matter (L_zero > L_orig): V = 50304 logits per token
    # make each step cost ~1 s on a loaded 2-core box.
    cfg = with_overrides(PRESETS["tiny"], out=out, acts={"max_actors": 1},
                         train_lm={"max_iters": 6, "batch_size": 2, "eval_interval": 6})
    train_lm.train(cfg)
    collect(cfg)
    return out


@pytest.fixture(scope="module")
def run_dir(ray_local, tmp_path_factory):
    out = make_run(str(tmp_path_factory.mktemp("sweep_run")))
    assert store.acts_manifest(out)["rows"] == N_TRAIN * 16
    return out


def argv(out: str, name: str, *extra: str, pack: int = 1) -> list[str]:
    return ["--preset", "tiny", "--out", out, "--name", name, "--sae.batch_size", "128",
            "--eval_interval", "16", "--checkpoint_interval", "16", "--cpus_per_trial", "0.5",
            "--pack", str(pack), *extra]


def reports(trial: dict) -> list[dict]:
    text = store.read_bytes(store.join(trial["dir"], "result.json")).decode()
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.slow
def test_grid_2x2_reports_to_tune_tensorboard_and_html(run_dir):
    summary = sweep_sae.main(argv(run_dir, "grid", "--l1_coeff", "1e-3", "1e-2", "--lr",
                                  "1e-3", "3e-3", "--max_concurrent_trials", "4"))
    exp = store.join(run_dir, "sweep", "grid")
    assert summary["experiment"] == exp and not summary["restored"]
    trials = store.read_json(store.join(exp, "trials.json"))["trials"]
    assert [(t["l1_coeff"], t["lr"]) for t in trials] == [
        (1e-3, 1e-3), (1e-3, 3e-3), (1e-2, 1e-3), (1e-2, 3e-3)]
    for t in trials:
        assert t["status"] == "done" and t["sae_dir"] == store.join(t["dir"], "sae")
        assert t["dir"] == store.join(exp, t["name"]) and t["name"].startswith(
            f"l1_{t['l1_coeff']:g}_lr_{t['lr']:g}_")
        assert os.path.isfile(store.join(t["sae_dir"], "sae_lens", "sae_weights.safetensors"))
        m = t["metrics"]
        assert m["step"] == 32 and 0 < m["l0"] < 256 and np.isfinite(m["loss_recovered"])
        assert np.isfinite(m["loss_recovered_mean"]) and m["kl"] > 0
        assert set(m) >= {"mse", "explained_variance", "dead", "ultralow", "dense",
                          "ce_increase", "L_bdec", "window_rows", "dead_eval"}
        results = reports(t)
        # cheap reports every 4 steps (tiny's report_interval), evals at 16 and 32
        assert [r["step"] for r in results] == list(range(4, 33, 4))
        assert [r["timesteps_total"] for r in results] == list(range(4, 33, 4))
        assert [r["training_iteration"] for r in results] == list(range(1, 9))
        assert [r.get("eval_step") for r in results] == [None] * 3 + [16] * 4 + [32]
        assert all(0 <= r["dead_fraction"] <= 1 and r["train_l0"] >= 0 for r in results)
        assert results[-1]["setup_s"] > 0 and results[-1]["l0"] == m["l0"]
        assert results[-1][HEADLINE] == m.get(HEADLINE, m["loss_recovered"])
        # no per-feature arrays in any result row or CSV column: scalars (and the config)
        for r in results:
            assert all(isinstance(v, (int, float, str, bool, type(None)))
                       for k, v in r.items() if k != "config"), r
        header = open(store.join(t["dir"], "progress.csv")).readline().split(",")
        assert "log10_density" not in header and "timesteps_total" in header
        events = [f for f in os.listdir(t["dir"]) if f.startswith("events.out.tfevents")]
        assert len(events) == 2   # Tune's scalars + DensityHistograms
        hist = next(f for f in events if f.endswith(".density"))
        assert b"ray/tune/log10_density" in open(store.join(t["dir"], hist), "rb").read()
        assert os.path.isfile(store.join(t["dir"], "density.npy"))
    assert trials[2]["metrics"]["l0"] < trials[0]["metrics"]["l0"]  # larger l1, sparser
    # every trial evaluates on the same seeded sample of val contexts: the same baselines
    assert len({tuple(t["metrics"][k] for k in ("L_orig", "L_zero", "L_mean", "eval_tokens"))
                for t in trials}) == 1
    page = open(summary["report"]).read()
    assert summary["report"] == store.join(exp, "report", "index.html")
    assert all(t["name"] in page for t in trials) and "&#9733;" in page
    assert "loss recovered vs mean ablation" in page and "CE increase" in page
    for png in ("pareto.png", "density.png"):
        assert open(store.join(exp, "report", png), "rb").read(4) == b"\x89PNG"
    # the report is re-creatable from the files alone
    os.remove(summary["report"])
    again = sweep_sae.main(argv(run_dir, "grid", "--l1_coeff", "1e-3", "1e-2", "--lr",
                                "1e-3", "3e-3", "--report-only"))
    assert open(again["report"]).read().count("<tr") == 5


@pytest.mark.slow
def test_packed_trials_train_what_separate_trials_train(run_dir):
    """--pack 2 over the grid test's l1 axis at lr 3e-3: one trial, two SAEs on one stream;
    each member is its own trials.json row with its own export, bit-identical to its
    separate trial of the grid test (the same batches, the same shared resampling draws)."""
    grid = store.join(run_dir, "sweep", "grid", "trials.json")
    if not os.path.exists(grid):
        pytest.skip("compares against test_grid_2x2's trials (run the module)")
    summary = sweep_sae.main(argv(run_dir, "packed", "--l1_coeff", "1e-3", "1e-2", "--lr",
                                  "3e-3", pack=2))
    trials = summary["trials"]
    assert [(t["l1_coeff"], t["lr"], t["status"]) for t in trials] == [
        (1e-3, 3e-3, "done"), (1e-2, 3e-3, "done")]
    (trial_dir,) = {t["trial"] for t in trials}
    assert trial_dir.startswith("pack2_l1_0.001_lr_0.003_")
    alone = {(t["l1_coeff"], t["lr"]): t for t in store.read_json(grid)["trials"]}
    for t in trials:
        assert t["sae_dir"] == store.join(run_dir, "sweep", "packed", trial_dir, "sae",
                                          f"l1_{t['l1_coeff']:g}_lr_{t['lr']:g}")
        assert t["name"] == f"{trial_dir}/l1_{t['l1_coeff']:g}_lr_{t['lr']:g}"
        assert os.path.isfile(store.join(t["sae_dir"], "sae_lens", "sae_weights.safetensors"))
        other = alone[(t["l1_coeff"], t["lr"])]
        assert (open(store.join(t["sae_dir"], "sae.safetensors"), "rb").read()
                == open(store.join(other["sae_dir"], "sae.safetensors"), "rb").read())
        for k in ("l0", "mse", "loss_recovered", "dead", "n_resampled"):
            assert t["metrics"][k] == other["metrics"][k]
        assert t["last_report"]["step"] == 32
    results = reports({"dir": store.join(run_dir, "sweep", "packed", trial_dir)})
    assert [r["timesteps_total"] for r in results] == list(range(4, 33, 4))
    assert set(results[-1]["members"]) == {"l1_0.001_lr_0.003", "l1_0.01_lr_0.003"}
    assert results[-1]["best_member"] == "l1_0.001_lr_0.003"     # less sparse, recovers more
    assert all(isinstance(v, (int, float)) for m in results[-1]["members"].values()
               for v in m.values())
    page = open(summary["report"]).read()
    assert all(t["name"] in page for t in trials)


@pytest.mark.slow
def test_crashed_trial_resumes_from_its_checkpoint_a_killed_service_restarts_wandb_logs(
        run_dir, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    marker = tmp_path / "crashed"
    monkeypatch.setenv("MONO_TEST_SAE_FAIL_AT", f"20:{marker}")
    exp = store.join(run_dir, "sweep", "crash")
    name = resample.service_name(exp)
    killed = {}

    def kill_service_once_it_is_up():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                service = ray.get_actor(name, namespace=resample.NAMESPACE)
                killed["pid"] = ray.get(service.stats.remote())["pid"]
                break
            except ValueError:  # not created yet
                time.sleep(0.2)
        ray.kill(service, no_restart=False)
        while time.monotonic() < deadline:  # the kill is asynchronous: wait for the restart
            pid = ray.get(service.stats.remote())["pid"]
            if pid != killed["pid"]:
                killed["new_pid"] = pid
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_service_once_it_is_up, daemon=True)
    killer.start()
    # resampling at 24, after the resume: most features of this point die by then
    summary = sweep_sae.main(argv(run_dir, "crash", "--l1_coeff", "1e-2", "--lr", "3e-3",
                                  "--resample_at", "24", "--dead_window", "8",
                                  "--max_failures", "1", "--wandb"))
    killer.join(10)
    (trial,) = summary["trials"]
    assert marker.exists(), "the fault switch did not fire"
    assert trial["status"] == "done" and trial["metrics"]["step"] == 32
    # crashed at step 20, resumed from the step-16 checkpoint: no step reported twice. Tune
    # puts back the result.json of its last sync before the crash (rows after it are lost)
    steps = [r["step"] for r in reports(trial)]
    assert steps == sorted(set(steps)) and steps[-4:] == [20, 24, 28, 32], steps
    assert killed.get("new_pid") not in (None, killed["pid"]), killed
    assert trial["metrics"]["n_resampled"] > 0       # the restarted service drew for it
    # W&B, offline without a key: one run for the trial, its retry included
    runs = [d for d in os.listdir(store.join(trial["dir"], "wandb")) if d.startswith("offline-")]
    assert len(runs) == 1 and runs[0].endswith(trial["trial_id"]), runs


@pytest.mark.slow
def test_rerun_restores_an_interrupted_sweep_without_redoing_finished_trials(
        run_dir, tmp_path, monkeypatch):
    args = argv(run_dir, "restore", "--l1_coeff", "1e-3", "1e-2", "--lr", "1e-3",
                "--max_failures", "0", "--max_concurrent_trials", "2")
    monkeypatch.setenv("MONO_TEST_SAE_FAIL_AT", f"20:{tmp_path / 'crashed'}")
    with pytest.raises(RuntimeError, match="1 of 2 trials did not finish"):
        sweep_sae.main(args)
    exp = store.join(run_dir, "sweep", "restore")
    first = {t["status"]: t for t in store.read_json(store.join(exp, "trials.json"))["trials"]}
    assert set(first) == {"done", "error"} and "injected failure" in first["error"]["error"]
    assert [r["step"] for r in reports(first["error"])] == [4, 8, 12, 16]
    done = first["done"]["dir"]
    sae_files = [store.join(done, f) for f in ("sae/cfg.json", "sae/sae.safetensors")]
    mtimes = [os.path.getmtime(f) for f in sae_files]
    before = (open(store.join(done, "result.json")).read(), sorted(os.listdir(done)))
    page = open(store.join(exp, "report", "index.html")).read()
    assert "injected failure" in page

    monkeypatch.delenv("MONO_TEST_SAE_FAIL_AT")
    summary = sweep_sae.main(args)       # the same command again: Tuner.restore
    assert summary["restored"] and [t["status"] for t in summary["trials"]] == ["done"] * 2
    resumed = next(t for t in summary["trials"] if t["name"] == first["error"]["name"])
    assert [r["step"] for r in reports(resumed)] == list(range(4, 33, 4))  # from 16, not 0
    # the finished trial was not rerun: same export, same reports, same checkpoints
    assert [os.path.getmtime(f) for f in sae_files] == mtimes
    assert (open(store.join(done, "result.json")).read(), sorted(os.listdir(done))) == before
    assert len(reports(first["done"])) == 8

    with pytest.raises(UserError, match="started with other settings"):
        sweep_sae.main(argv(run_dir, "restore", "--l1_coeff", "1e-3", "--lr", "1e-3"))


def test_bad_input_fails_before_any_trial(run_dir, tmp_path, capsys):
    for bad, message in ((["--l1_coeff"], "grid is empty"),
                         (["--lr", "1e-3", "-0.001"], "values must be positive")):
        with pytest.raises(SystemExit):
            sweep_sae.main(argv(run_dir, "bad", *bad))
        assert message in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(BadOutput, match="is not writable"):
        sweep_sae.main(argv(run_dir, "bad", "--storage_path", str(blocker / "sub")))
    with pytest.raises(MissingInput, match="no activation manifest"):
        sweep_sae.main(argv(str(tmp_path / "empty"), "bad"))
    assert not os.path.exists(store.join(run_dir, "sweep", "bad"))


def test_pareto_front():
    pts = [(5.0, 0.9), (10.0, 0.95), (10.0, 0.8), (20.0, 0.94), (2.0, 0.5), (5.0, 0.9)]
    assert pages.pareto_front(pts) == [True, True, False, False, True, True]


def test_report_escapes_everything(tmp_path):
    exp = str(tmp_path / "exp")
    evil = "<script>alert(1)</script>"
    trials = [
        {"name": f"l1_0.001_lr_0.001_{evil}", "l1_coeff": 1e-3, "lr": 1e-3, "status": "done",
         "dir": f"{exp}/a", "sae_dir": f"{exp}/a/sae", "last_report": {},
         "metrics": {"step": 8, "l0": 3.0, "loss_recovered": 0.7, "mse": 0.1,
                     "loss_recovered_mean": 0.4, "ce_increase": 0.2, "kl": 0.1,
                     "explained_variance": 0.5, "dead": 1, "ultralow": 0, "dense": 2}},
        {"name": "b", "l1_coeff": 1e-2, "lr": 1e-3, "status": "error", "dir": f"{exp}/b",
         "error": f'RuntimeError: "{evil}" & more', "last_report": {"step": 4}},
    ]
    store.write_json(f"{exp}/trials.json", {"experiment": exp, "trials": trials})
    os.makedirs(f"{exp}/a")
    np.save(f"{exp}/a/density.npy", np.array([0.0, 1e-3, 0.02, 0.5]))
    page = open(pages.write_sweep_report(exp)).read()
    assert "<script" not in page and "&lt;script&gt;" in page and "&amp; more" in page
    assert 'href="../a/sae/"' in page and os.path.isfile(f"{exp}/report/density.png")
