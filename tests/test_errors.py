"""User errors from every job: one line `prog: error: message`, exit status 2, before Ray.

The acceptance tests drive the real entry points (`python -m ray_jobs.<job>`) in a
subprocess, one mistake each (`CASES`: the issue's table, --out a file for every job, an
unwritable --out, a corrupt activation shard, an LM of the wrong width), and assert: status
2, exactly one line on stderr naming the file or value, no traceback, nothing under or
above --out changed (every path's mode, size, mtime and bytes), and no Ray started (the
subprocess's private RAY_TMPDIR stays empty: a local `ray.init` creates its session dir
there). The subprocesses run two at a time; each is mostly imports (torch, ray.data: ~2.5 s
of CPU). One module fixture writes a tiny run dir without Ray: token shards and an
untrained tiny LM through mono.store, activation shards through `acts.Collector`, an SAE
export through `sae_files.export`; each case copies the stage it needs. The rest test
mono.cli's mechanism and the pipeline's stage checks in process.
"""

import hashlib
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from mono import acts, cli, reader, sae_files, store, train_sae
from mono.config import PRESETS, with_overrides
from mono.errors import BadOutput, MissingInput, UserError
from mono.lm import Lm
from mono.sae import SparseAutoencoder
from ray_jobs import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T, N_TRAIN, N_VAL = 64, 128, 8  # tiny preset: ctx_len 64, 16 rows per context -> 2048 rows
JOBS = ("tokenize_corpus", "train_lm", "collect_acts", "sweep_sae", "analyze", "pipeline")


def write_tokens(out: str) -> None:
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        path = store.join(store.Layout(out).tokens(split), "part-00000.parquet")
        store.write_table_atomic(path, store.token_table(np.arange(n),
                                                         rng.integers(0, 50000, (n, T))))
        splits[split] = {"rows": n, "tokens": n * T,
                         "files": [{"name": "part-00000.parquet", "first": 0, "rows": n}]}
    store.write_json(store.Layout(out).tokens_manifest, {
        "tokenizer": "synthetic", "ctx_len": T, "dtype": "uint16",
        "rows": {s: v["rows"] for s, v in splits.items()}, "splits": splits})


def write_lm(cfg) -> None:
    torch.manual_seed(0)
    store.save_lm(store.Layout(cfg.out).lm, Lm(cfg.lm), cfg)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """{"tokens": dir with token shards, "lm": + the LM, "acts": + activation shards and an
    SAE export in sae_single/sae (analyze's choice without a sweep)}."""
    root = tmp_path_factory.mktemp("errors")
    dirs = {k: str(root / k) for k in ("tokens", "lm", "acts")}
    write_tokens(dirs["tokens"])
    shutil.copytree(dirs["tokens"], dirs["lm"])
    cfg = with_overrides(PRESETS["tiny"], out=dirs["lm"])
    write_lm(cfg)
    shutil.copytree(dirs["lm"], dirs["acts"])
    cfg = with_overrides(PRESETS["tiny"], out=dirs["acts"])
    tm, settings, n = acts.check_inputs(cfg)
    chunks = acts.plan(n, cfg.acts.shard_contexts)
    collector = acts.Collector(cfg.out, settings)
    for first, k in chunks:
        collector.collect(first, k)
    store.write_json(store.Layout(cfg.out).acts_manifest,
                     acts._manifest(cfg, settings, tm, chunks))
    sae = SparseAutoencoder(cfg.lm.d_mlp, cfg.sae.n_features, cfg.sae.l1_coeff)
    sae_files.export(store.join(cfg.out, "sae_single"), cfg, sae, train_sae.check_inputs(cfg),
                     metrics={})
    return dirs


def copy(built, stage: str, dest) -> str:
    shutil.copytree(built[stage], dest)
    return str(dest)


def snapshot(out: str) -> dict | None:
    """Every path under out (and out itself): kind, size, mtime_ns and a hash of the bytes."""
    if not os.path.lexists(out):
        return None
    found = {}
    for root, dirs, files in os.walk(out):
        for name in [".", *dirs, *files]:
            path = os.path.normpath(os.path.join(root, name))
            st = os.lstat(path)
            digest = None
            if os.path.isfile(path):
                with open(path, "rb") as fh:
                    digest = hashlib.sha256(fh.read()).hexdigest()
            found[os.path.relpath(path, out)] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    if os.path.isfile(out):
        st = os.stat(out)
        with open(out, "rb") as fh:
            found["."] = (st.st_mode, st.st_size, st.st_mtime_ns, fh.read())
    return found


def run_job(job: str, argv: list[str], tmp, wrap: list[str] = (), env: dict | None = None):
    """`python -m ray_jobs.<job> --preset tiny ARGV` with a private RAY_TMPDIR ->
    (returncode, stdout, stderr, what Ray left in its temp dir)."""
    ray_tmp = tmp / "ray_tmp"
    ray_tmp.mkdir(exist_ok=True)
    inherited = {k: v for k, v in os.environ.items() if k != cli.TRACEBACK_ENV}
    env = {**inherited, "PYTHONPATH": ROOT, "RAY_TMPDIR": str(ray_tmp),
           "MONO_CACHE_DIR": str(tmp / "cache"), **(env or {})}
    proc = subprocess.run([*wrap, sys.executable, "-m", f"ray_jobs.{job}", "--preset", "tiny",
                           *argv], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    return proc.returncode, proc.stdout, proc.stderr, sorted(os.listdir(ray_tmp))


def _read_only(path: str) -> list[str]:
    """A command prefix under which `path` is unwritable for real, also for root: a
    read-only bind mount in a private mount namespace (gone with the process); without
    root, the directory's mode."""
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        return []
    wrap = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind -o ro "$0" "$0" && exec "$@"', path]
    if shutil.which("unshare") is None or subprocess.run(
            [*wrap, "sh", "-c", f'! touch "{path}/.probe" 2>/dev/null'],
            capture_output=True).returncode != 0:
        return None
    return wrap


def _corrupt_shard(out: str) -> str:
    shard = store.acts_files(out)[1]
    with open(shard, "r+b") as fh:  # the footer (and its magic bytes) are the file's end
        fh.truncate(os.path.getsize(shard) // 2)
    return shard


def _wider_lm(out: str) -> None:
    write_lm(with_overrides(PRESETS["tiny"], out=out, lm={"d_mlp": 256}))


def _empty(path) -> str:
    path.mkdir()
    return str(path)


def _file(path) -> str:
    path.write_text("mine\n")
    return str(path)


# Each case: tmp dir, built -> (job, --out, other argv, substrings the line must hold, wrap);
# the table first, then every job's --out checks, the corrupt shard, the wide LM.
def _cases():
    cases = {
        "sweep_sae before collection": lambda tmp, b: (
            "sweep_sae", (out := copy(b, "lm", tmp / "run")), [],
            [f"no activation manifest at {out}/acts/manifest.json", "collect_acts"]),
        "collect_acts before tokenization": lambda tmp, b: (
            "collect_acts", (out := _empty(tmp / "run")), [],
            [f"no token manifest at {out}/tokens/manifest.json", "tokenize_corpus"]),
        "train_lm before tokenization": lambda tmp, b: (
            "train_lm", (out := _empty(tmp / "run")), [],
            [f"no token manifest at {out}/tokens/manifest.json", "tokenize_corpus"]),
        "tokenize_corpus missing corpus": lambda tmp, b: (
            "tokenize_corpus", str(tmp / "run"), ["--corpus", "/no/such/file.txt"],
            ["corpus '/no/such/file.txt' not found"]),
        "analyze before the sweep": lambda tmp, b: (
            "analyze", (out := copy(b, "lm", tmp / "run")), [],
            ["no SAE to analyse", f"{out}/sweep/sweep/trials.json"]),
        "pipeline missing corpus": lambda tmp, b: (
            "pipeline", str(tmp / "run"), ["--corpus", "/no/such/file.txt"],
            ["error: stage tokenize: corpus '/no/such/file.txt' not found"]),
    }
    for job in JOBS:
        cases[f"{job} --out FILE"] = lambda tmp, b, job=job: (
            job, (out := _file(tmp / "FILE")), [], [f"--out {out} is a file, not a directory"])
    for job in ("sweep_sae", "analyze"):
        cases[f"{job} corrupt activation shard"] = lambda tmp, b, job=job: (
            job, (out := copy(b, "acts", tmp / "run")), [],
            [f"corrupt activation shard {_corrupt_shard(out)}", "collect_acts"])
    for job, stage, names in (
            ("collect_acts", "lm", ["the LM checkpoint in", "d_mlp=256 (asked 128)"]),
            ("train_lm", "lm", ["the LM checkpoint in", "d_mlp=256 (asked 128)"]),
            ("analyze", "acts", ["has d_mlp=256", "d_in=128"])):
        cases[f"{job} LM of the wrong width"] = lambda tmp, b, job=job, stage=stage, \
            names=names: (job, (out := copy(b, stage, tmp / "run")), _wider_lm(out) or [],
                          [f"{out}/lm", *names])
    cases["tokenize_corpus --out unwritable"] = lambda tmp, b: (
        "tokenize_corpus", (out := _empty(tmp / "run")), [],
        [f"--out {out}: directory {out} is not writable"], _read_only(out))
    cases["pipeline --out below an unwritable dir"] = lambda tmp, b: (
        "pipeline", f"{(ro := _empty(tmp / 'ro'))}/sub/run", [],
        [f"--out {ro}/sub/run: directory {ro} is not writable"], _read_only(ro))
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def outcomes(built, tmp_path_factory):
    """Every case's job, run at once (a subprocess is mostly imports: ~2 s of CPU) ->
    {case: (setup, before, result, after)}, with snapshots of the case dir (--out and the
    directories above it) before and after."""
    setups = {}
    for name, make in CASES.items():
        tmp = tmp_path_factory.mktemp("case")   # RAY_TMPDIR and MONO_CACHE_DIR go here
        case = tmp / "case"                      # --out and whatever holds it, snapshotted
        case.mkdir()
        job, out, argv, names, *wrap = make(case, built)
        setups[name] = (tmp, job, out, argv, names, wrap[0] if wrap else [])
    before = {name: snapshot(str(s[0] / "case")) for name, s in setups.items()}

    def run(name):
        tmp, job, out, argv, _, wrap = setups[name]
        return None if wrap is None else run_job(job, ["--out", out, *argv], tmp, wrap)

    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(setups, pool.map(run, setups)))
    return {name: (setups[name], before[name], results[name],
                   snapshot(str(setups[name][0] / "case"))) for name in setups}


@pytest.mark.slow  # the first case waits for all: ~50 s of CPU, mostly torch/ray imports
@pytest.mark.timeout(900)
@pytest.mark.parametrize("case", CASES)
def test_user_error_is_one_line_before_ray(case, outcomes):
    (_, job, out, _, names, _), before, result, after = outcomes[case]
    if result is None:
        pytest.skip("root without a private read-only mount: cannot make a dir unwritable")
    code, stdout, stderr, ray_files = result
    lines = stderr.splitlines()
    assert code == 2, (code, stdout, stderr)
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"python -m ray_jobs.{job}: error: "), stderr
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert "Traceback" not in stdout + stderr
    assert "Started a local Ray instance" not in stdout + stderr
    assert ray_files == [], f"Ray started: {ray_files}"
    assert after == before   # nothing under (or above) --out created, changed or removed


def test_traceback_on_request(tmp_path):
    code, _, stderr, ray_files = run_job(
        "tokenize_corpus", ["--out", str(tmp_path / "run"), "--corpus", "/no/such", "--traceback"],
        tmp_path)
    assert code == 2 and ray_files == []
    assert "Traceback (most recent call last)" in stderr and "raise MissingInput" in stderr
    assert stderr.splitlines()[-1].startswith("python -m ray_jobs.tokenize_corpus: error: ")


# --- the mechanism, in process ---------------------------------------------------------------


def test_main_reports_user_errors_and_keeps_bugs(capsys, monkeypatch):
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)

    def job(error):
        def main(argv, init=None):
            raise error
        return main

    with pytest.raises(SystemExit) as exc:
        cli.main(job(MissingInput("no such thing: x\nsecond line")), "prog", argv=[])
    assert exc.value.code == 2
    assert capsys.readouterr().err == "prog: error: no such thing: x second line\n"
    with pytest.raises(ZeroDivisionError):  # a bug: not caught, its traceback intact
        cli.main(job(ZeroDivisionError("bug")), "prog", argv=[])
    with pytest.raises(FileNotFoundError):  # a builtin error is not a user error either
        cli.main(job(FileNotFoundError("internal")), "prog", argv=[])
    monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
    with pytest.raises(SystemExit) as exc:
        cli.main(job(BadOutput("--out x is a file")), "prog", argv=[])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback (most recent call last)" in err
    assert err.endswith("\nprog: error: --out x is a file\n")


def test_main_unwraps_a_user_error_raised_in_a_ray_task(capsys):
    from ray.exceptions import RayTaskError

    remote = RayTaskError("collect", "Traceback (most recent call last):\n  ...",
                          UserError("corrupt token shard /x/part-0.parquet"))
    err = remote.as_instanceof_cause()
    assert isinstance(err, UserError)

    def main(argv, init=None):
        raise err

    with pytest.raises(SystemExit):
        cli.main(main, "prog", argv=[])
    assert capsys.readouterr().err == "prog: error: corrupt token shard /x/part-0.parquet\n"


def test_parse_checks_out_and_inputs_before_init(tmp_path, s3, capsys):
    calls = []

    def check(cfg):
        calls.append("check")
        raise MissingInput(f"nothing in {cfg.out}")

    with pytest.raises(MissingInput, match="nothing in"):
        cli.parse(["--preset", "tiny", "--out", str(tmp_path)], "p", "d", ("tokens",),
                  init=lambda: calls.append("init"), check=check)
    assert calls == ["check"]
    (tmp_path / "f").write_text("")
    with pytest.raises(BadOutput, match="is a file"):
        cli.parse(["--preset", "tiny", "--out", str(tmp_path / "f")], "p", "d", ("tokens",),
                  init=lambda: calls.append("init"), check=check)
    assert calls == ["check"]   # --out is checked first
    # a URI is checked against its store while parsing (store.check_remote), here the
    # localhost S3 server: a usage error naming the URI
    with pytest.raises(SystemExit) as exit_:
        cli.parse(["--preset", "tiny", "--out", "s3://no-such-bucket/run"], "p", "d",
                  ("tokens",))
    assert exit_.value.code == 2
    assert "bucket s3://no-such-bucket does not exist" in capsys.readouterr().err


def test_check_out_accepts_what_a_stage_can_create(tmp_path):
    cli.check_out(str(tmp_path))
    cli.check_out(str(tmp_path / "new" / "deeper"))
    (tmp_path / "FILE").write_text("")
    with pytest.raises(BadOutput, match=f"^--out {tmp_path}/FILE/run: {tmp_path}/FILE is a "
                                        f"file, not a directory$"):
        cli.check_out(str(tmp_path / "FILE" / "run"))
    os.symlink(tmp_path / "gone", tmp_path / "link")
    with pytest.raises(BadOutput, match="broken symbolic link"):
        cli.check_out(str(tmp_path / "link" / "run"))


def test_check_shards_names_a_missing_or_short_shard(built, tmp_path):
    out = copy(built, "acts", tmp_path / "run")
    shards = reader.shard_list(out)
    reader.check_shards(shards)   # the intact dataset passes
    os.remove(shards["files"][0])
    with pytest.raises(UserError, match=f"activation shard {shards['files'][0]} is missing"):
        reader.check_shards(shards)
    with pytest.raises(UserError, match=f"{shards['files'][1]} holds 1024 rows, its manifest "
                                        f"says 5"):
        reader.check_shards({"files": shards["files"][1:], "rows": [5]})


def test_pipeline_checks_each_stage_when_it_reaches_it(tmp_path, monkeypatch):
    """Stage 1 before init (nothing written); a later stage's check after the stage before
    it ran, its error naming the stage, and its run never called."""
    calls = []

    def fake_check(module):
        def check(cfg):
            calls.append(f"check {module}")
            if module == bad:
                raise MissingInput(f"no input for {module}")
        return check

    def fake_run(module):
        return lambda cfg: calls.append(f"run {module}")

    monkeypatch.setattr(pipeline, "_stage_check", fake_check)
    monkeypatch.setattr(pipeline, "_stage_run", fake_run)
    out = tmp_path / "run"
    bad = "tokens"
    with pytest.raises(MissingInput, match="^stage tokenize: no input for tokens$"):
        pipeline.main(["--preset", "tiny", "--out", str(out)],
                      init=lambda: calls.append("init"))
    assert calls == ["check tokens"] and not out.exists()
    calls.clear()
    bad = "acts"
    with pytest.raises(MissingInput, match="^stage collect_acts: no input for acts$"):
        pipeline.main(["--preset", "tiny", "--out", str(out)],
                      init=lambda: calls.append("init"))
    assert calls == ["check tokens", "init", "run tokens", "check train_lm", "run train_lm",
                     "check acts"]
