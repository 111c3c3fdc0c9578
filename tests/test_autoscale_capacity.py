"""mono.cluster without a cluster: capacity from published node types, the local --out
refusal, and a GPU stage on a cluster that can never have a GPU (fast; one local Ray)."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from mono import acts, cluster
from mono.config import PRESETS
from mono.errors import BadOutput, UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def published(ray_local):
    """cluster.yaml's node types published in the session's Ray, removed afterwards (other
    tests size their pools from capacity())."""
    from ray.experimental.internal_kv import _internal_kv_del

    cluster.publish(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    yield
    _internal_kv_del(cluster.KV_KEY, namespace=cluster.KV_NAMESPACE)


def test_capacity_is_what_runs_without_node_types(ray_local):
    assert cluster.node_types() is None and not cluster.can_scale()
    assert cluster.capacity() == {k: float(v) for k, v in ray_local.cluster_resources().items()}
    assert not cluster.multi_node()
    cluster.check_local_out("/tmp/run")   # one node: a local --out is fine


def test_capacity_counts_every_worker_type_at_max_workers(published, ray_local):
    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    types = raw["available_node_types"]
    cap = cluster.capacity()
    gpus = sum(t["resources"]["GPU"] * t["max_workers"] for n, t in types.items()
               if n != raw["head_node_type"])
    assert gpus > 0 and cap["GPU"] == gpus
    cpus = sum(t["resources"]["CPU"] * t["max_workers"] for n, t in types.items()
               if n != raw["head_node_type"]) + types[raw["head_node_type"]]["resources"]["CPU"]
    assert cap["CPU"] == max(cpus, ray_local.cluster_resources()["CPU"])
    assert cluster.can_scale() and cluster.multi_node()
    with pytest.raises(BadOutput, match=r"--out /tmp/run is a local path.*s3://BUCKET/PREFIX "
                                        r"or gs://BUCKET/PREFIX"):
        cluster.check_local_out("/tmp/run")
    cluster.check_local_out("s3://bucket/run")


def test_gpu_collection_without_any_gpu_capacity_is_refused(ray_local):
    cfg = dataclasses.replace(PRESETS["tiny"], acts=dataclasses.replace(
        PRESETS["tiny"].acts, use_gpu=True))
    with pytest.raises(UserError, match="--acts.use_gpu: this Ray cluster has no GPU, and no "
                                        "autoscaler node types are published"):
        acts._pool(cfg)


def test_the_fake_cluster_has_cluster_yamls_node_types():
    from fake_cluster import FAKE_HEAD, autoscaling_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    fake = autoscaling_config(6399, {"gpu_worker": 2, "cpu_worker": 1})
    real_types, fake_types = raw["available_node_types"], fake["available_node_types"]
    head = raw["head_node_type"]
    assert set(real_types) - {head} == set(fake_types) - {FAKE_HEAD}
    # The head offers nothing to tasks in both; GPUs only on the same worker types.
    assert real_types[head]["resources"] == fake_types[FAKE_HEAD]["resources"] == \
        {"CPU": 0, "GPU": 0}
    for name in set(real_types) - {head}:
        assert (real_types[name]["resources"]["GPU"] > 0) == \
            (fake_types[name]["resources"]["GPU"] > 0), name
        assert real_types[name]["min_workers"] == fake_types[name]["min_workers"] == 0, name
    # Workers reach the bucket; the head publishes the node types the jobs size pools from.
    for name in set(real_types) - {head}:
        assert "IamInstanceProfile" in real_types[name]["node_config"], name
    assert any("mono.cluster publish ~/ray_bootstrap_config.yaml" in c
               for c in raw["head_start_ray_commands"])


@pytest.mark.parametrize("stage, section, change, flag", [
    ("sweep", "sweep", {"gpus_per_trial": 1.0}, "--sweep.gpus_per_trial"),
    ("train_lm", "train_lm", {"use_gpu": True, "num_workers": 1}, "--train_lm.use_gpu"),
    ("features", "analysis", {"use_gpu": True}, "--analysis.use_gpu"),
])
def test_gpu_stages_without_any_gpu_capacity_are_refused_at_once(ray_local, tmp_path, stage,
                                                                  section, change, flag):
    """Before reading any input: the run dir here is empty."""
    import importlib

    tiny = PRESETS["tiny"]
    cfg = dataclasses.replace(tiny, out=str(tmp_path / "run"), **{
        section: dataclasses.replace(getattr(tiny, section), **change)})
    with pytest.raises(UserError, match=f"{flag}: this Ray cluster has no GPU"):
        importlib.import_module(f"mono.{stage}").run(cfg)
    assert not (tmp_path / "run").exists()
