"""A local autoscaling Ray cluster shaped like cluster.yaml (test_autoscale.py, bench/cluster.py).

Ray's fake multi-node provider: a real autoscaler and a real raylet per "node", with fake
GPU resources, all on this machine (../shared/ENVIRONMENT.md, "Autoscaling cluster on one
box"). The node types are cluster.yaml's, by name and shape: a head that offers no CPUs and
no GPUs (so stage work and the job's driver land on workers), a GPU worker type and a CPU
worker type, both `min_workers: 0` — scaled down to this box (1 CPU + 1 fake GPU, 2 CPUs).

The head runs in its own PID namespace (`unshare --pid --fork --mount-proc --kill-child`),
so the autoscaler's worker raylets and every job process are in it too, and killing
unshare ends them all; nothing outside is touched (never `ray stop`). Ports are free ones.
Every "node" shares this machine's disk: tests use the localhost S3 server as --out, which
is what catches node-local paths.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
# Per node type: the resources of the local stand-in for cluster.yaml's instance.
LOCAL_RESOURCES = {"head": {"CPU": 0, "GPU": 0},
                   "gpu_worker": {"CPU": 1, "GPU": 1},
                   "cpu_worker": {"CPU": 2, "GPU": 0}}


FAKE_HEAD = "ray.head.default"


def can_run() -> str | None:
    """None when a fake cluster can start here, else why not."""
    if not (VENV_BIN / "ray").exists():
        return f"no `ray` CLI next to {sys.executable}"
    if shutil.which("unshare") is None:
        return "no unshare"
    probe = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "true"]
    if subprocess.run(probe, capture_output=True).returncode != 0:
        return "unshare --pid needs root here"
    return None


def free_ports(n: int) -> list[int]:
    """n distinct ports free on 127.0.0.1 right now (all bound at once, then released)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def autoscaling_config(gcs_port: int, max_workers: dict[str, int],
                       idle_timeout_minutes: float = 0.2) -> dict:
    """The fake provider's config with cluster.yaml's node types (names, min_workers 0,
    GPU only on the GPU type), local resources, and per-type max_workers."""
    real = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    types = {}
    for name in real["available_node_types"]:
        head = name == real["head_node_type"]
        # The fake provider knows its head by this type name only.
        types[FAKE_HEAD if head else name] = {
            "resources": LOCAL_RESOURCES[name], "node_config": {}, "min_workers": 0,
            "max_workers": 0 if head else max_workers[name]}
    return {
        "cluster_name": "fake_mono", "max_workers": sum(max_workers.values()),
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True,
                     "gcs_address": f"127.0.0.1:{gcs_port}"},
        "available_node_types": types, "head_node_type": FAKE_HEAD,
        "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": idle_timeout_minutes,
        "docker": {}, "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {},
        "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }


class FakeCluster:
    """start() -> a head with its autoscaler; submit() a job; nodes() from the state API;
    stop() kills the namespace. A watcher thread records when each node first showed up."""

    def __init__(self, max_workers: dict[str, int] | None = None,
                 idle_timeout_minutes: float = 0.2):
        self.max_workers = max_workers or {"gpu_worker": 2, "cpu_worker": 1}
        self.idle_timeout_minutes = idle_timeout_minutes
        self.temp_dir = tempfile.mkdtemp(prefix="rfc-", dir="/tmp")   # short: socket paths
        self.gcs, self.dash, self.agent, self.client = free_ports(4)
        self.url = f"http://127.0.0.1:{self.dash}"
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        self.env.update(PATH=f"{VENV_BIN}{os.pathsep}{self.env.get('PATH', '')}",
                        RAY_TMPDIR=self.temp_dir, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
                        AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_FAKE_CLUSTER="1",
                        RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
                        # Every fake node sees the whole shared box's memory use (other
                        # sessions included): its OOM killer would kill our job at random.
                        RAY_memory_monitor_refresh_ms="0")
        self.proc: subprocess.Popen | None = None
        self.seen: dict[str, dict] = {}   # node id -> {"t", "resources", "state", "end"}
        self._stop = threading.Event()
        self.t_start = time.monotonic()

    def start(self, timeout: float = 120) -> FakeCluster:
        cfg = Path(self.temp_dir) / "autoscaling.yaml"
        cfg.write_text(yaml.safe_dump(autoscaling_config(
            self.gcs, self.max_workers, self.idle_timeout_minutes)))
        head = LOCAL_RESOURCES["head"]
        cmd = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
               str(VENV_BIN / "ray"), "start", "--head", "--block",
               f"--autoscaling-config={cfg}", f"--num-cpus={head['CPU']}",
               f"--num-gpus={head['GPU']}", "--node-ip-address=127.0.0.1",
               f"--port={self.gcs}", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={self.dash}", f"--dashboard-agent-listen-port={self.agent}",
               f"--ray-client-server-port={self.client}", f"--temp-dir={self.temp_dir}",
               f"--object-store-memory={200 * 1024**2}", "--disable-usage-stats"]
        self.log = open(Path(self.temp_dir) / "head.log", "wb")
        self.t_start = time.monotonic()
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.url}/api/version", timeout=2) as r:
                    if json.load(r).get("ray_version"):
                        break
            except OSError:
                pass
            time.sleep(0.5)
        if self.proc.poll() is None and time.monotonic() < deadline:
            # What cluster.yaml's head start commands do: publish the node types, so jobs
            # size their pools from what the cluster can scale to (mono.cluster).
            env = self.env | {"RAY_ADDRESS": f"127.0.0.1:{self.gcs}", "PYTHONPATH": str(ROOT)}
            subprocess.run([sys.executable, "-m", "mono.cluster", "publish", str(cfg)],
                           env=env, check=True, capture_output=True, timeout=120)
            threading.Thread(target=self._watch, daemon=True).start()
            return self
        self.stop()
        raise RuntimeError(f"fake cluster head not ready (exit {self.proc.poll()}):\n"
                           + self.head_log()[-3000:])

    def head_log(self) -> str:
        return (Path(self.temp_dir) / "head.log").read_text(errors="replace")

    def nodes(self) -> list[dict]:
        """Every node the GCS knows (alive and dead): node_id, state, resources_total."""
        url = f"{self.url}/api/v0/nodes?limit=1000&detail=1"
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.load(r)["data"]["result"]["result"]

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                for n in self.nodes():
                    entry = self.seen.setdefault(n["node_id"], {
                        "t": time.monotonic() - self.t_start,
                        "resources": n.get("resources_total", {}), "is_head": n["is_head_node"]})
                    if n["state"] == "DEAD" and "end" not in entry:
                        entry["end"] = time.monotonic() - self.t_start
                    entry["state"] = n["state"]
            except OSError:
                pass
            self._stop.wait(0.5)

    def gpu_nodes(self) -> dict[str, dict]:
        return {k: v for k, v in self.seen.items() if v["resources"].get("GPU", 0) > 0}

    def submit(self, entrypoint: list[str], env_vars: dict, timeout: float = 420,
               entrypoint_num_cpus: float = 1, working_dir: bool = True
               ) -> tuple[subprocess.CompletedProcess, float]:
        """`ray job submit --working-dir <repo>` (blocks until the job ends); -> (result,
        seconds since submit)."""
        runtime_env = {"env_vars": env_vars}
        if working_dir:
            runtime_env["excludes"] = [".venv", ".git", "runs", "wandb"]
            where = ["--working-dir", str(ROOT)]
        else:
            # All fake nodes share one session dir, runtime_resources/ included, and the
            # job's unpacked working dir vanished from under its driver mid-job (getcwd()
            # failed in torch's import). Real nodes each have their own disk; here the code
            # travels on PYTHONPATH instead, and the driver runs in a scratch dir.
            runtime_env["env_vars"] = env_vars | {"PYTHONPATH": str(ROOT)}
            scratch = tempfile.mkdtemp(prefix="job-", dir=self.temp_dir)
            entrypoint = ["sh", "-c", f"cd {scratch} && exec {shlex.join(entrypoint)}"]
            where = []
        cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", self.url,
               "--submission-id", f"mono-{secrets.token_hex(4)}", *where,
               "--entrypoint-num-cpus", str(entrypoint_num_cpus),
               "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint]
        self.t_submit = time.monotonic() - self.t_start
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        return r, time.monotonic() - self.t_start - self.t_submit

    def driver_nodes(self) -> set[str]:
        """The nodes the jobs' drivers run on (the job API's driver_node_id)."""
        with urllib.request.urlopen(f"{self.url}/api/jobs/", timeout=10) as r:
            return {j["driver_node_id"] for j in json.load(r) if j.get("driver_node_id")}

    def terminate_node(self, node_id: str) -> list[int]:
        """Terminate a worker node as its cloud would: SIGKILL, at once, every process of
        it: its raylet (with the object store), started by the fake provider with this node
        id in its environment, and everything under the raylet (agents, workers). -> the
        pids killed, as the cluster's processes see them (its PID namespace's)."""
        tag = f"RAY_OVERRIDE_NODE_ID_FOR_TESTING={node_id}".encode()
        parent, tagged = {}, set()
        for pid in self._processes():
            try:
                parent[pid] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1]
                                  .split()[1])
                if tag in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    tagged.add(pid)
            except (OSError, IndexError, ValueError):   # gone meanwhile
                pass
        doomed = set(tagged)
        while True:   # every descendant of a tagged process
            more = {p for p, pp in parent.items() if pp in doomed} - doomed
            if not more:
                break
            doomed |= more
        killed = []
        for pid in sorted(doomed):
            with contextlib.suppress(OSError):
                inner = _ns_pid(pid)
                os.kill(pid, 9)
                killed.append(inner)
        return killed

    def kill(self, ns_pid: int) -> list[int]:
        """SIGKILL the cluster's process `ns_pid` (a pid as its PID namespace sees it);
        -> [ns_pid], or [] if it is gone."""
        for pid in self._processes():
            with contextlib.suppress(OSError, StopIteration, ValueError):
                if _ns_pid(pid) == ns_pid:
                    os.kill(pid, 9)
                    return [ns_pid]
        return []

    def _processes(self) -> list[int]:
        """The pids (in this, the test's namespace) of every process in the cluster's PID
        namespace, `ray start` (its init) included."""
        assert self.proc is not None
        ns = _pid_ns(_children(self.proc.pid)[0])
        pids = []
        for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
            with contextlib.suppress(OSError):   # gone meanwhile
                if _pid_ns(pid) == ns:
                    pids.append(pid)
        return pids

    def wait_idle_workers_gone(self, timeout: float = 90) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            alive = [n for n in self.nodes() if n["state"] == "ALIVE" and not n["is_head_node"]]
            if not alive:
                return True
            time.sleep(1)
        return False

    def stop(self) -> None:
        self._stop.set()
        if self.proc is not None and self.proc.poll() is None:
            # SIGKILL to unshare: --kill-child kills `ray start` (the namespace's PID 1), and
            # the kernel then kills every process left in the namespace.
            self.proc.kill()
            self.proc.wait(timeout=30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def terminate_when_hung(cluster: FakeCluster, marker: Path, out: dict) -> threading.Thread:
    """A thread that waits for the collection actor hung mid-write (acts' fail mode "hang"
    writes its node id, shard and pid into `marker`), then terminates that GPU node:
    out["node"], ["shard"], ["pid"], the pids ["killed"] and the job's ["drivers"] nodes at
    that moment, and ["t"], when (the cluster's clock)."""
    def watch():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            said = marker.read_text().split() if marker.exists() else []
            if said:
                node = said[0]
                out.update(node=node, shard=said[1], pid=int(said[2]),
                           drivers=cluster.driver_nodes(),
                           t=time.monotonic() - cluster.t_start)
                if node not in out["drivers"]:
                    out["killed"] = cluster.terminate_node(node)
                else:  # the job would die with its node: kill the actor alone, so the job
                    # ends (its shard is redone) and the test fails at once on out["drivers"]
                    out["killed"] = cluster.kill(out["pid"])
                return
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _ns_pid(pid: int) -> int:
    """The pid that process `pid` (of this namespace) has in its own, innermost one."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("NSpid:"))
               .split()[-1])


def _pid_ns(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/pid")
