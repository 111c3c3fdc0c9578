"""cluster.yaml: Ray's own offline validation (what `ray up` runs first) plus our invariants.

prepare_config + validate_config are private Ray API (ray.autoscaler._private.util), which is
one more reason the project pins Ray; they need no cloud credentials (RAY_NOTES.md §5).
"""

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _pins() -> dict[str, str]:
    """Dependency name -> requirement string for the exact (==) pins in pyproject.toml.

    A regex, not tomllib: the project supports Python 3.10, which has no tomllib.
    """
    text = (ROOT / "pyproject.toml").read_text()
    return {m["name"]: m["req"]
            for m in re.finditer(r'"(?P<req>(?P<name>[\w-]+)(\[[\w,]+\])?==[^"]+)"', text)}


def _validate(cfg: dict) -> dict:
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_rays_validation(raw):
    cfg = _validate(raw)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    for name, node_type in types.items():
        # Explicit integer resources: the autoscaler can plan without asking EC2, and Ray
        # starts each node with exactly these (RAY_OVERRIDE_RESOURCES).
        assert set(node_type["resources"]) >= {"CPU", "GPU"}, name
        assert all(isinstance(v, int) for v in node_type["resources"].values()), name


def test_gpu_workers_scale_from_zero_and_idle_out(raw):
    cfg = _validate(raw)
    gpu_types = {n: t for n, t in cfg["available_node_types"].items()
                 if t["resources"].get("GPU", 0) > 0}
    assert gpu_types, "no GPU worker type"
    assert cfg["head_node_type"] not in gpu_types
    for name, node_type in gpu_types.items():
        assert node_type["min_workers"] == 0, name
        assert 0 < node_type["max_workers"] <= cfg["max_workers"], name
    assert 0 < raw["idle_timeout_minutes"] <= 60
    assert raw["provider"]["cache_stopped_nodes"] is False


def test_setup_installs_the_project_with_the_pinned_ray_and_torch(raw):
    cmds = "\n".join(raw["setup_commands"])
    pins = _pins()
    # The cluster, the client (this venv) and pyproject.toml agree on Ray.
    ray_pin = pins["ray"]
    assert ray_pin == f"ray[default,data,tune,train]=={ray.__version__}" == \
        "ray[default,data,tune,train]==2.60.0"
    assert f'"{ray_pin}"' in cmds
    # torch: the pyproject pin, from the PyTorch index (CUDA build on GPU nodes, CPU elsewhere).
    torch_pin = pins["torch"]
    assert torch_pin == "torch==2.13.0"
    assert torch_pin in cmds
    assert re.search(r"download\.pytorch\.org/whl/cu1\d\d", cmds)
    assert "download.pytorch.org/whl/cpu" in cmds
    assert cmds.index(torch_pin) < cmds.index("-e ~/mono"), "torch must precede the project"
    # The project itself, from the repo that file_mounts copies to every node.
    assert raw["file_mounts"]["~/mono"] == "."
    assert re.search(r"pip install .*-e ~/mono\b", cmds)
    assert "**/.venv" in raw["rsync_exclude"]


def test_start_commands_use_token_auth_and_a_local_dashboard(raw):
    head = " ".join(raw["head_start_ray_commands"])
    worker = " ".join(raw["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in worker
    assert "--dashboard-host=127.0.0.1" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def _unknown_top_key(c):
    c["idle_timeout_minute"] = 5


def _unknown_node_type_key(c):
    c["available_node_types"]["gpu_worker"]["max_worker"] = 2


def _fractional_gpu_resource(c):
    c["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5


def _head_type_missing(c):
    c["head_node_type"] = "nope"


def _too_many_min_workers(c):
    c["available_node_types"]["gpu_worker"]["min_workers"] = c["max_workers"] + 1


def _no_provider_type(c):
    del c["provider"]["type"]


@pytest.mark.parametrize(("breakage", "error", "match"), [
    (_unknown_top_key, jsonschema.ValidationError, "'idle_timeout_minute' was unexpected"),
    (_unknown_node_type_key, jsonschema.ValidationError, "'max_worker' was unexpected"),
    (_fractional_gpu_resource, jsonschema.ValidationError, "0.5 is not of type 'integer'"),
    (_head_type_missing, ValueError, "head_node_type"),
    (_too_many_min_workers, ValueError, "sum of `min_workers`"),
    (_no_provider_type, KeyError, "type"),
])
def test_broken_copies_fail_validation(raw, breakage, error, match):
    broken = copy.deepcopy(raw)
    breakage(broken)
    with pytest.raises(error, match=match):
        _validate(broken)
