"""cluster.yaml: Ray's own offline validation (what `ray up` runs first) plus our invariants.

prepare_config + validate_config are private Ray API (ray.autoscaler._private.util), which is
one more reason the project pins Ray; they need no cloud credentials (RAY_NOTES.md §5).
"""

import copy
import re
import subprocess
import sys
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


def test_every_node_runs_one_pinned_image_with_the_pinned_ray_and_torch(raw):
    """docker/Dockerfile bakes Ray, CUDA torch and the project into one image: a scale-up
    installs nothing (no setup commands), and the pins agree with pyproject.toml and the
    client's Ray."""
    pins = _pins()
    ray_pin = pins["ray"]
    assert ray_pin == f"ray[default,data,tune,train]=={ray.__version__}" == \
        "ray[default,data,tune,train]==2.60.0"
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)$", dockerfile, re.M).group(1)
    assert base == f"rayproject/ray:{ray.__version__}-py311-gpu"
    torch_pin = pins["torch"]
    assert torch_pin == "torch==2.13.0"
    install = re.search(rf"pip install .*{re.escape(torch_pin)} .*"
                        rf"download\.pytorch\.org/whl/cu1\d\d", dockerfile)
    assert install, "CUDA torch from the PyTorch index"
    project = re.search(r"pip install .*\"/home/ray/mono\"", dockerfile)
    assert project and f'"{ray_pin}"' in project.group(0)
    assert install.start() < project.start(), "torch must precede the project"
    docker = raw["docker"]
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(),
                        re.M).group(1)
    assert docker["image"].endswith(f"/mono:{version}") and "latest" not in docker["image"]
    assert docker["pull_before_run"] is True
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert raw[key] == [], key   # nothing installed on a new node
    assert "~/mono" not in raw["file_mounts"]   # code travels with --working-dir


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


# --- pin-ami: the host AMI alias -> the AMI id it names today -------------------------------

# A public SSM alias the localhost server (moto) publishes, as AWS does; cluster.yaml's own
# (the Deep Learning Base AMI's) is not in moto's catalogue.
MOTO_ALIAS = "/aws/service/ami-amazon-linux-latest/amzn2-ami-hvm-x86_64-gp2"


def _pin(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mono.cluster", "pin-ami", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_pin_ami_rewrites_every_alias_to_todays_ami_id(s3, tmp_path):
    text = (ROOT / "cluster.yaml").read_text()
    aliases = set(re.findall(r"ImageId:\s*resolve:ssm:(\S+)", text))
    assert len(aliases) == 1, aliases   # one host image for every node type
    path = tmp_path / "cluster.yaml"
    path.write_text(text.replace(aliases.pop(), MOTO_ALIAS))
    region = yaml.safe_load(text)["provider"]["region"]
    ami = s3.client(service="ssm", region_name=region).get_parameter(
        Name=MOTO_ALIAS)["Parameter"]["Value"]

    r = _pin(path)
    assert r.returncode == 0, r.stderr
    assert f"resolve:ssm:{MOTO_ALIAS} -> {ami}" in r.stdout
    pinned = yaml.safe_load(path.read_text())
    assert {t["node_config"]["ImageId"] for t in pinned["available_node_types"].values()} \
        == {ami}
    assert "resolve:ssm" not in re.sub(r"#.*", "", path.read_text())   # comments may say it
    assert path.read_text().count("# Ray's AWS bootstrap") == 1   # the comments are kept
    _validate(pinned)
    before = path.read_bytes()
    r = _pin(path)   # idempotent
    assert r.returncode == 0 and "no resolve:ssm: ImageId left to pin" in r.stdout
    assert path.read_bytes() == before


def test_pin_ami_names_an_alias_that_does_not_resolve(s3, tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text((ROOT / "cluster.yaml").read_text())   # the DLAMI alias: not in moto
    before = path.read_bytes()
    r = _pin(path)
    assert r.returncode == 2 and "resolve:ssm:/aws/service/deeplearning" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert path.read_bytes() == before
