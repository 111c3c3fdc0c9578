"""Object storage for real: every stage against an S3 server on 127.0.0.1 (moto's server mode).

The `s3` fixture (conftest.py) starts it before Ray, so the driver and every Ray worker reach
it through AWS_ENDPOINT_URL. What "the same artifacts" means here, per artifact:
- token shards, LM weights (safetensors), activation shards: identical bytes (all three are
  deterministic functions of corpus, seed and config, with torch's thread counts fixed by
  mono/threads.py);
- SAE trials, matched by grid point (trial ids are random): identical SAE weights (bytes of
  sae.safetensors) and equal final metrics, timings excepted;
- analysis: equal features.parquet tables.
Manifests name their own location (`dir`, `inputs`) and timings, so they are compared
without those keys.

Bad input (no bucket, no or wrong credentials, a prefix the user may not write, a malformed
URI) is refused by `store.check_remote`, which every job runs while parsing its arguments:
BadOutput naming the URI, before Ray starts or any stage writes anything.
"""

import contextlib
import json
import time

import pytest

from mono import store
from mono.config import Config
from mono.errors import BadOutput

# --- bad input: refused at once, nothing written -------------------------------------------


@contextlib.contextmanager
def _moto_auth():
    """moto checks signatures and IAM policies while inside (process-wide: its server thread
    runs in this process); outside, every request is allowed."""
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    saved = settings.INITIAL_NO_AUTH_ACTION_COUNT
    settings.INITIAL_NO_AUTH_ACTION_COUNT, ActionAuthenticatorMixin.request_count = 0, 0
    try:
        yield
    finally:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = saved


def _user(s3, name: str, actions: list[str], bucket: str) -> dict:
    """An IAM user allowed `actions` on bucket and its objects; its access key env."""
    iam = s3.client(service="iam")
    iam.create_user(UserName=name)
    policy = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Action": actions,
        "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}]}
    iam.put_user_policy(UserName=name, PolicyName="p", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}


def test_missing_bucket_is_refused(s3):
    with pytest.raises(BadOutput, match=r"s3://no-such-bucket-x/run: bucket s3://no-such-"
                                        r"bucket-x does not exist"):
        store.check_remote("s3://no-such-bucket-x/run")


def test_malformed_uris_are_refused(s3):
    with pytest.raises(BadOutput, match="nope://b/run: not a usable storage URI"):
        store.check_remote("nope://b/run")
    bucket = s3.bucket()
    store.write_bytes_atomic(f"s3://{bucket}/file", b"x")
    with pytest.raises(BadOutput, match=f"s3://{bucket}/file is an object, not a prefix"):
        store.check_remote(f"s3://{bucket}/file")


def test_read_only_credentials_are_refused_and_nothing_is_written(s3, monkeypatch):
    bucket = s3.bucket()
    # HeadBucket needs s3:ListBucket on AWS; moto names it s3:HeadBucket.
    reader = _user(s3, f"reader-{bucket}", ["s3:ListBucket", "s3:HeadBucket", "s3:GetObject"],
                   bucket)
    writer = _user(s3, f"writer-{bucket}", ["s3:*"], bucket)
    with _moto_auth():
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", writer["AWS_ACCESS_KEY_ID"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", writer["AWS_SECRET_ACCESS_KEY"])
        store.check_remote(f"s3://{bucket}/run")   # allowed: no error
        for k, v in reader.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(BadOutput, match=rf"--out s3://{bucket}/run: cannot write under "
                                            r"this prefix .*ACCESS_DENIED"):
            store.check_remote(f"s3://{bucket}/run")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
        with pytest.raises(BadOutput, match=rf"s3://{bucket}/run: cannot reach bucket "
                                            rf"s3://{bucket} .*credentials"):
            store.check_remote(f"s3://{bucket}/run")
    # The probe of the check that passed is gone; what is left is the empty "directory"
    # marker the run's first write makes anyway.
    assert s3.keys(bucket) == ["run/"]


def test_no_credentials_are_refused(s3, monkeypatch):
    bucket = s3.bucket()
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    with _moto_auth(), pytest.raises(BadOutput, match=rf"--out s3://{bucket}/run: cannot "
                                                      rf"reach bucket s3://{bucket}"):
        store.check_remote(f"s3://{bucket}/run")


def test_a_job_refuses_a_bad_uri_before_any_stage(s3, capsys):
    from ray_jobs import pipeline

    bucket = s3.bucket()
    with pytest.raises(SystemExit) as exit_info:   # cli.parse: `prog: error: ...`, status 2
        pipeline.main(["--preset", "tiny", "--out", f"s3://{bucket}-missing/run"])
    assert exit_info.value.code == 2
    assert f"s3://{bucket}-missing/run: bucket s3://{bucket}-missing does not exist" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):
        pipeline.main(["--preset", "tiny", "--out", f"s3://{bucket}/run",
                       "--sweep.storage_path", "s3://no-such-bucket-x/tune"])
    assert "--sweep.storage_path s3://no-such-bucket-x/tune: bucket" in capsys.readouterr().err
    # --out passed its check (leaving its empty marker), the Tune storage did not: not even
    # cfg.json is written.
    assert s3.keys(bucket) == ["run/"]


# --- the whole tiny pipeline on the bucket -----------------------------------------------


def _files(root: str, sub: str) -> dict[str, bytes]:
    """relative name -> bytes of every file under root/sub (local dir or URI)."""
    import pyarrow.fs as pafs

    fs, base = store.resolve(store.join(root, sub))
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    return {i.path[len(base) + 1:]: store.read_bytes(store.join(root, sub, i.path[len(base) + 1:]))
            for i in infos if i.type == pafs.FileType.File}


def _trials(out: str) -> dict:
    """(l1_coeff, lr) -> trials.json entry of the run's sweep."""
    trials = store.read_json(store.join(out, "sweep", "sweep", "trials.json"))["trials"]
    return {(t["l1_coeff"], t["lr"]): t for t in trials}


TIMING_KEYS = ("seconds", "samples_per_s", "wall_s", "setup_s", "eval_s", "time", "timestamp",
               "_s", "per_s")


def _untimed(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not any(t in k for t in TIMING_KEYS)}


def assert_same_artifacts(local: str, remote: str) -> None:
    """Run `remote` holds what run `local` holds, bit for bit (module docstring: what "same"
    means). Also what tests/test_autoscale.py asserts of a run whose processes landed on
    other nodes and in a job's driver: mono/threads.py keeps their torch thread counts."""
    for sub in ("tokens/train", "tokens/val", "acts"):
        a, b = _files(local, sub), _files(remote, sub)
        shards = {k for k in a if k.endswith(".parquet")}
        assert shards and shards == {k for k in b if k.endswith(".parquet")}, sub
        assert not sorted(k for k in shards if a[k] != b[k]), sub
    assert store.read_bytes(store.join(local, "lm", store.LM_WEIGHTS)) == \
        store.read_bytes(store.join(remote, "lm", store.LM_WEIGHTS))
    ignore = {"dir", "inputs", "last_run", "files", "corpus", "acts_config"}
    ma, mb = store.acts_manifest(local), store.acts_manifest(remote)
    assert {k: v for k, v in ma.items() if k not in ignore} == \
        {k: v for k, v in mb.items() if k not in ignore}
    assert [{k: v for k, v in f.items() if k != "node"} for f in ma["files"]] == \
        [{k: v for k, v in f.items() if k != "node"} for f in mb["files"]]
    # Sweep: the same SAEs and metrics per grid point.
    ta, tb = _trials(local), _trials(remote)
    assert ta.keys() == tb.keys() and len(ta) >= 2
    for point, a in ta.items():
        b = tb[point]
        assert a["status"] == b["status"] == "done" and b["node"], point
        assert store.read_bytes(store.join(a["sae_dir"], "sae.safetensors")) == \
            store.read_bytes(store.join(b["sae_dir"], "sae.safetensors")), point
        assert _untimed(a["metrics"]) == _untimed(b["metrics"]), point
    # Analysis: one trial's tables and pages.
    trial_a, trial_b = ({k.split("/")[0] for k in _files(o, "analysis") if "/" in k}
                        for o in (local, remote))   # a dir per trial, beside token_counts.json
    assert len(trial_a) == len(trial_b) == 1
    trial_a, trial_b = trial_a.pop(), trial_b.pop()
    fa, fb = _files(local, f"analysis/{trial_a}"), _files(remote, f"analysis/{trial_b}")
    assert "html/index.html" in fb and fa.keys() == fb.keys()
    assert store.read_table(store.join(local, "analysis", trial_a, "features.parquet")
                            ).equals(store.read_table(store.join(remote, "analysis",
                                                                 trial_b, "features.parquet")))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tiny_pipeline_on_s3_equals_the_local_run_and_resumes(ray_local, s3, tiny_reference):
    from mono import acts, sweep
    from ray_jobs import pipeline

    local, corpus = tiny_reference
    remote = f"s3://{s3.bucket()}/run"
    t0 = time.perf_counter()
    results = pipeline.main(["--preset", "tiny", "--out", remote, "--corpus", str(corpus)])
    wall = time.perf_counter() - t0
    assert all(r["ran"] for r in results if r["stage"] != "splitting"), results
    assert_same_artifacts(local, remote)
    # Analysis pages live in the bucket, next to the tables they show.
    assert any(k.endswith("/html/index.html") for k in _files(remote, "analysis"))
    ma = store.acts_manifest(remote)
    assert all(f["node"] == ray_local.get_runtime_context().get_node_id()
               for f in ma["files"])   # one node here; tests/test_autoscale.py: workers

    # A rerun resumes from the bucket: collection redoes only a lost shard, the sweep is
    # restored by Tuner.restore from the bucket and keeps its trials.
    cfg = Config.from_json(store.read_bytes(store.Layout(remote).cfg).decode())
    lost = ma["files"][-1]["name"]
    store.delete(store.join(remote, "acts", lost))
    t1 = time.perf_counter()
    manifest = acts.run(cfg)
    assert manifest["last_run"]["shards_written"] == 1
    assert list(manifest["last_run"]["node_per_shard"]) == [str(ma["files"][-1]["first"])]
    assert store.read_bytes(store.join(remote, "acts", lost)) == _files(local, "acts")[lost]
    before = _trials(remote)
    summary = sweep.run(cfg)
    rerun = time.perf_counter() - t1
    assert summary["restored"] is True
    assert {(t["l1_coeff"], t["lr"]): t["sae_dir"] for t in summary["trials"]} == \
        {p: t["sae_dir"] for p, t in before.items()}
    print(f"tiny pipeline on s3: {wall:.1f} s; rerun acts + sweep {rerun:.1f} s")
