"""What the Ray cluster can scale to, for sizing the stages' pools; no stage logic.

Reads (in the connected Ray cluster's GCS key-value store) the node types the autoscaler may
launch: mono's own record, written on the head by `python -m mono.cluster publish
~/ray_bootstrap_config.yaml` (cluster.yaml's head start commands; the job's driver runs on a
worker, which has no copy of the autoscaler's config), else the ClusterConfig that Ray's
autoscaler v2 and KubeRay report. Without either, the cluster is what runs now.

`capacity()` -> {resource: the most the cluster can hold at once}: the live nodes' totals,
or, with node types, the head plus every worker type at its max_workers (capped by the
cluster's max_workers), whichever is larger. `multi_node()`: more than one node now or
possible. `request(bundles)` asks the autoscaler for all of a pool's nodes at once
(`ray.autoscaler.sdk.request_resources`) instead of one scale-up round per pending actor;
`release()` withdraws that request so idle nodes can be removed.

`python -m mono.cluster pin-ami cluster.yaml` (`pin_ami`) replaces the host AMI's public SSM
alias in a cluster config with the AMI id it names today, before `ray up`.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

import ray

logger = logging.getLogger(__name__)

KV_NAMESPACE, KV_KEY = "mono", "autoscaler_node_types"


def node_types_from_config(cfg: dict) -> dict:
    """An autoscaler config (cluster.yaml / ray_bootstrap_config.yaml) -> the record
    published: {"max_workers", "head": type name, "types": {name: {"resources",
    "max_workers"}}}."""
    types = {name: {"resources": dict(t.get("resources", {})),
                    "max_workers": int(t.get("max_workers", 0))}
             for name, t in cfg.get("available_node_types", {}).items()}
    return {"max_workers": int(cfg.get("max_workers", sum(t["max_workers"]
                                                          for t in types.values()))),
            "head": cfg.get("head_node_type"), "types": types}


def publish(cfg: dict) -> None:
    """Store the node types of autoscaler config `cfg` in the connected cluster's GCS."""
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(KV_KEY, json.dumps(node_types_from_config(cfg)), overwrite=True,
                     namespace=KV_NAMESPACE)


def node_types() -> dict | None:
    """The published record (publish), else one built from Ray's reported ClusterConfig,
    else None."""
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(KV_KEY, namespace=KV_NAMESPACE)
    if raw:
        return json.loads(raw)
    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception:  # private API: absent or changed in another Ray
        config = None
    if config is None or not config.node_group_configs:
        return None
    types = {g.name or f"group{i}": {"resources": dict(g.resources),
                                     "max_workers": max(int(g.max_count), 0)}
             for i, g in enumerate(config.node_group_configs)}
    return {"max_workers": sum(t["max_workers"] for t in types.values()), "head": None,
            "types": types}


def capacity() -> dict[str, float]:
    """{resource: the most the cluster can hold at once} (module docstring)."""
    live = {k: float(v) for k, v in ray.cluster_resources().items()}
    record = node_types()
    if not record:
        return live
    total: dict[str, float] = {}
    budget = record["max_workers"]
    head = record["types"].get(record["head"] or "", {"resources": {}})
    for k, v in head["resources"].items():
        total[k] = total.get(k, 0.0) + v
    for name, t in record["types"].items():
        if name == record["head"]:
            continue
        n = min(t["max_workers"], budget)
        for k, v in t["resources"].items():
            total[k] = total.get(k, 0.0) + n * v
    return {k: max(live.get(k, 0.0), total.get(k, 0.0)) for k in live.keys() | total.keys()}


def check_gpus(what: str) -> int:
    """The GPUs the cluster can scale to; UserError naming `what` (the flag that asked for
    GPUs) when that is none, instead of waiting forever for a GPU that never comes."""
    from mono.errors import UserError

    gpus = int(capacity().get("GPU", 0))
    if gpus < 1:
        known = ("its autoscaler's node types have none" if node_types() else
                 "and no autoscaler node types are published (on a cluster that can add GPU "
                 "nodes, run `python -m mono.cluster publish ~/ray_bootstrap_config.yaml` on "
                 "the head, as cluster.yaml does)")
        raise UserError(f"{what}: this Ray cluster has no GPU, {known}; run on a GPU "
                        f"cluster or turn the option off")
    return gpus


def can_scale() -> bool:
    """Whether an autoscaler may add nodes (node types are known with max_workers > 0)."""
    record = node_types()
    return bool(record) and any(t["max_workers"] > 0 for n, t in record["types"].items()
                                if n != record["head"])


def torch_device(device: str) -> str:
    """The torch device for a process that asked Ray for `device` ("cuda" or "cpu"): "cpu",
    with a warning, when it holds a Ray GPU that has no CUDA behind it (Ray's fake
    multi-node GPUs, a node without the driver): the device comes from torch, not from the
    Ray resource."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        logger.warning("this process holds a Ray GPU but torch sees no CUDA device: using CPU")
        return "cpu"
    return device


def check_local_out(out: str) -> None:
    """BadOutput for a local --out on a cluster with more than one node (now or after
    scaling): every node would write its part to its own disk. Without a connected Ray (a
    job's init that started none, as the tests' stand-ins) there is no cluster to ask."""
    from mono import store
    from mono.errors import BadOutput

    if not store.is_uri(out) and ray.is_initialized() and multi_node():
        raise BadOutput(f"--out {out} is a local path, but this Ray cluster has (or can scale "
                        f"to) several nodes, each with its own disk: use an s3://BUCKET/PREFIX "
                        f"or gs://BUCKET/PREFIX URI")


def multi_node() -> bool:
    """More than one node alive now, or an autoscaler that may add some."""
    return sum(1 for n in ray.nodes() if n["Alive"]) > 1 or can_scale()


def request(bundles: list[dict]) -> None:
    """Ask the autoscaler for every bundle at once (a no-op without an autoscaler)."""
    from ray.autoscaler.sdk import request_resources

    if bundles and can_scale():
        request_resources(bundles=bundles)


def release() -> None:
    """Withdraw `request`'s standing request, so idle nodes can time out."""
    from ray.autoscaler.sdk import request_resources

    if can_scale():
        request_resources(bundles=[])


# --- pinning the host AMI ---------------------------------------------------------------

SSM_ALIAS = re.compile(r"^([ \t]*)ImageId:[ \t]*resolve:ssm:(\S+)", re.MULTILINE)


def pin_ami(path: str) -> dict[str, str]:
    """Rewrite every `ImageId: resolve:ssm:ALIAS` of cluster config `path` to the AMI id the
    alias names today, in the config's region, keeping the file's comments: nodes launched on
    later days then boot the same host (the alias moves with each AMI release). -> {alias:
    AMI id}. Idempotent; a UserError names an alias that does not resolve. Needs boto3 and
    AWS credentials (the AWS provider's own); AWS_ENDPOINT_URL reaches another server."""
    import yaml

    from mono.errors import UserError

    with open(path) as f:
        text = f.read()
    region = (yaml.safe_load(text).get("provider") or {}).get("region")
    aliases = sorted({alias for _, alias in SSM_ALIAS.findall(text)})
    if not aliases:
        return {}
    try:
        import boto3
        import botocore.exceptions
    except ImportError:
        raise UserError("pin-ami needs boto3 (pip install boto3), as `ray up` on AWS does")
    ssm, ec2 = (boto3.client(name, region_name=region) for name in ("ssm", "ec2"))
    pinned, names = {}, {}
    for alias in aliases:
        try:
            pinned[alias] = ssm.get_parameter(Name=alias)["Parameter"]["Value"]
            images = ec2.describe_images(ImageIds=[pinned[alias]])["Images"]
        except botocore.exceptions.BotoCoreError as err:
            raise UserError(f"{path}: cannot resolve resolve:ssm:{alias} in {region}: {err}")
        except botocore.exceptions.ClientError as err:
            raise UserError(f"{path}: cannot resolve resolve:ssm:{alias} in {region}: "
                            f"{err.response.get('Error', {}).get('Message', err)}")
        names[alias] = images[0].get("Name", "") if images else ""
    today = time.strftime("%Y-%m-%d")

    def pin(m: re.Match) -> str:
        alias = m[2]
        return (f"{m[1]}# {names[alias]}: resolve:ssm:{alias} on {today}\n"
                f"{m[1]}ImageId: {pinned[alias]}")

    from mono import store

    store.write_bytes_atomic(path, SSM_ALIAS.sub(pin, text).encode())
    return pinned


def _main(argv: list[str]) -> int:
    import yaml

    if len(argv) != 2 or argv[0] not in ("publish", "pin-ami"):
        print("usage: python -m mono.cluster publish AUTOSCALER_CONFIG.yaml\n"
              "       python -m mono.cluster pin-ami CLUSTER.yaml", file=sys.stderr)
        return 2
    if argv[0] == "pin-ami":
        from mono.errors import UserError

        try:
            pinned = pin_ami(argv[1])
        except UserError as err:
            print(f"mono.cluster pin-ami: error: {err}", file=sys.stderr)
            return 2
        for alias, ami in pinned.items():
            print(f"{argv[1]}: resolve:ssm:{alias} -> {ami}")
        if not pinned:
            print(f"{argv[1]}: no resolve:ssm: ImageId left to pin")
        return 0
    with open(argv[1]) as f:
        cfg = yaml.safe_load(f)
    ray.init(address="auto", logging_level=logging.WARNING)
    publish(cfg)
    print(json.dumps(node_types()))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
