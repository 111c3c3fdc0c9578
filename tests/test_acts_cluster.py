"""Stage 3 on a simulated two-node cluster (ray.cluster_utils.Cluster: head + one node).

`ray.init` cannot run twice in one process and the session's `ray_local` fixture may already
hold this one, so the cluster lives in a subprocess (its own Ray, its own temp dir). The
reference is the same collection computed without Ray (the Collector called directly, one
torch thread like the actors), so the comparison is byte for byte.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from test_acts import make_run

from mono import acts, store

ROOT = Path(__file__).resolve().parents[1]

CLUSTER_RUN = textwrap.dedent("""
    import json, logging, sys
    import ray
    from ray.cluster_utils import Cluster
    from mono import acts
    from mono.config import Config

    logging.basicConfig(level=logging.INFO)
    cfg = Config.load(sys.argv[1])
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False, "object_store_memory": 128 * 1024**2})
    try:
        cluster.add_node(num_cpus=2, object_store_memory=128 * 1024**2)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        data_ctx = ray.data.DataContext.get_current()
        data_ctx.enable_progress_bars = False
        data_ctx.wait_for_min_actors_s = 300  # both actors up before the first shard
        nodes = len([n for n in ray.nodes() if n["Alive"]])
        manifest = acts.run(cfg)
        print("RESULT " + json.dumps({"nodes": nodes, "manifest": manifest}))
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


@pytest.mark.slow
def test_two_node_cluster_writes_the_one_node_content(tmp_path):
    # 2-CPU actors on 2-CPU nodes: one actor per node, so both nodes write shards.
    kw = dict(max_actors=2, cpus_per_actor=2, threads_per_actor=1, shard_contexts=16)
    cfg, _, _ = make_run(tmp_path / "cluster", **kw)
    cfg_path = tmp_path / "cfg.json"
    cfg.save(cfg_path)
    ray_tmp = tempfile.mkdtemp(prefix="mono-rc-", dir="/tmp")  # unix sockets: <= 107 bytes
    env = os.environ | {"RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(ROOT)}
    try:
        proc = subprocess.run([sys.executable, "-c", CLUSTER_RUN, str(cfg_path)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=420)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(next(line for line in proc.stdout.splitlines()
                             if line.startswith("RESULT "))[len("RESULT "):])
    assert result["nodes"] == 2
    manifest = result["manifest"]
    assert manifest["rows"] == 200 * 16 and manifest["last_run"]["shards_written"] == 13
    assert len(manifest["last_run"]["shards_per_node"]) == 2, manifest["last_run"]

    # The one-node reference, computed without Ray with the actors' thread count.
    ref_cfg, _, _ = make_run(tmp_path / "ref", **kw)
    _, settings, _ = acts.check_inputs(ref_cfg)
    assert settings["lm_sha256"] == manifest["lm_sha256"]
    threads = torch.get_num_threads()
    try:
        collector = acts.Collector(ref_cfg.out, settings, n_threads=1)
        for first, n in acts.plan(200, ref_cfg.acts.shard_contexts):
            collector.collect(first, n)
    finally:
        torch.set_num_threads(threads)
    for f in manifest["files"]:
        ours = Path(store.Layout(cfg.out).acts) / f["name"]
        ref = Path(store.Layout(ref_cfg.out).acts) / f["name"]
        assert ours.read_bytes() == ref.read_bytes(), f["name"]
