"""The cluster path as a user takes it: a real two-node Ray cluster on the loopback interface (``ray start --head``
with its own ports and temp dir, a second ``ray start --address``), jobs sent with ``ray job submit --working-dir .``,
one of them while the second node's raylet is SIGKILLed; every (sample, method, target) exactly once. The test
stops exactly the processes it started (never ``ray stop``, which would stop every Ray on the machine).
Also: cluster.yaml through Ray's own autoscaler config validation, with the Ray version pinned everywhere."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

from attribution.data.sample_sets import photo_samples
from attribution.data.shards import write_shards
from workers.sink import read_table

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OBJECT_STORE = 300 * 1024 ** 2  # bytes per node: small, other Ray instances share this machine
# A loopback address Ray keeps as given (it replaces 127.0.0.1 and "localhost" by the machine's network address).
NODE_IP = "127.0.0.2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports() -> dict[str, int]:
    """Every port a node listens on, chosen free (the defaults would collide with other Ray instances)."""
    base = random.randrange(20000, 29900, 100)  # above Ray's default 10002-19999, below the ephemeral ports
    return {"--node-manager-port": _free_port(), "--object-manager-port": _free_port(),
            "--dashboard-agent-listen-port": _free_port(), "--dashboard-agent-grpc-port": _free_port(),
            "--runtime-env-agent-port": _free_port(), "--metrics-export-port": _free_port(),
            "--min-worker-port": base, "--max-worker-port": base + 99}


class LocalCluster:
    """A head and one more node, started with ``ray start`` in a temp dir of their own; ``stop`` ends every
    process whose command line names that temp dir, and their children (the job drivers)."""

    def __init__(self) -> None:
        self.temp_dir = f"/tmp/xrc-{uuid.uuid4().hex[:8]}"  # short: Ray's socket paths live under it
        self.gcs_port, self.dashboard_port = _free_port(), _free_port()
        self.head_ports, self.worker_ports = _node_ports(), _node_ports()
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                    # the GCS checks raylets every second instead of every 3 s: a dead node is noticed sooner
                    "RAY_health_check_period_ms": "1000",
                    "DASHBOARD_METRIC_PORT": str(_free_port()),  # not the default 44227 another head may hold
                    # Ray's memory monitor counts the whole machine's memory: on a shared machine it would kill
                    # this cluster's workers for other programs' use (the kernel's OOM killer still applies)
                    "RAY_memory_monitor_refresh_ms": "0"}
        self.env.pop("RAY_ADDRESS", None)
        self.started: set[int] = set()

    @property
    def address(self) -> str:
        """The dashboard/job address for ``ray job submit``."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def ray(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        """Run the venv's ``ray`` CLI with the cluster's environment."""
        result = subprocess.run([str(BIN / "ray"), *args], env=self.env, capture_output=True, text=True,
                                timeout=timeout, cwd=REPO)
        self._remember()
        return result

    def start(self) -> None:
        """``ray start --head`` (3 logical CPUs: room for both actors and the read/decode/write tasks once the
        second node is gone) and a second node (2 CPUs, resource ``second_node``)."""
        common = [f"--node-ip-address={NODE_IP}", f"--object-store-memory={OBJECT_STORE}",
                  f"--temp-dir={self.temp_dir}", "--disable-usage-stats"]
        head = self.ray("start", "--head", f"--port={self.gcs_port}", "--include-dashboard=true",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                        f"--ray-client-server-port={_free_port()}", "--num-cpus=3", *common,
                        *[f"{k}={v}" for k, v in self.head_ports.items()])
        assert head.returncode == 0, head.stdout[-2000:] + head.stderr[-2000:]
        worker = self.ray("start", f"--address={NODE_IP}:{self.gcs_port}", "--resources", '{"second_node": 1}',
                          "--num-cpus=2", *common, *[f"{k}={v}" for k, v in self.worker_ports.items()])
        assert worker.returncode == 0, worker.stdout[-2000:] + worker.stderr[-2000:]
        deadline = time.time() + 60
        while self.alive_nodes() < 2:
            assert time.time() < deadline, "the second node did not join within 60 s"
            time.sleep(1)

    def alive_nodes(self) -> int:
        """Nodes the GCS counts as alive (``ray list nodes``)."""
        listed = self.ray("list", "nodes", f"--address={NODE_IP}:{self.gcs_port}", "--format", "json",
                          "--filter", "state=ALIVE", timeout=60)
        return len(json.loads(listed.stdout)) if listed.returncode == 0 and listed.stdout.strip() else 0

    def _ours(self) -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(self.temp_dir in part for part in proc.info["cmdline"] or []):
                    found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found

    def _remember(self) -> None:
        self.started.update(p.pid for p in self._ours())

    def second_raylet(self) -> psutil.Process:
        """The raylet of the second node (found by its node-manager port)."""
        port = f"--node_manager_port={self.worker_ports['--node-manager-port']}"
        matches = [p for p in self._ours() if "raylet" in p.name() and port in p.cmdline()]
        assert len(matches) == 1, f"expected one raylet with {port}, found {len(matches)}"
        return matches[0]

    def workers_on(self, raylet: psutil.Process) -> list[str]:
        """Process titles of the worker processes a raylet started (``ray::MapWorker(...)``, ``ray::IDLE`` …)."""
        try:
            return [" ".join(c.cmdline()).strip()[:80] for c in raylet.children() if "ray::" in " ".join(c.cmdline())]
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, every process of this cluster (and their children); never anyone else's."""
        self._remember()
        procs: dict[int, psutil.Process] = {}
        for pid in self.started:
            try:
                proc = psutil.Process(pid)
                procs[pid] = proc
                procs.update({c.pid: c for c in proc.children(recursive=True)})
            except psutil.NoSuchProcess:
                continue
        procs.update({p.pid: p for p in self._ours()})
        for proc in procs.values():
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(list(procs.values()), timeout=10)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)


@pytest.fixture(scope="module")
def cluster():
    """A started two-node cluster, stopped (exactly its own processes) afterwards, also when a test fails.
    Ray waits a fixed 30 s for a new raylet to register; on an overloaded machine the start is tried once more."""
    start = time.perf_counter()
    for attempt in (1, 2):
        local = LocalCluster()
        try:
            local.start()
            break
        except (AssertionError, subprocess.TimeoutExpired) as exc:
            local.stop()
            shutil.rmtree(local.temp_dir, ignore_errors=True)
            if attempt == 2:
                raise
            print(f"\ncluster start failed, trying once more: {str(exc).strip().splitlines()[-1][:200]}")
    try:
        print(f"\ncluster of 2 nodes up in {time.perf_counter() - start:.1f} s ({local.temp_dir})")
        yield local
    finally:
        local.stop()
        leftovers = [p.pid for p in local._ours()]
        assert not leftovers, f"processes of the test cluster still running: {leftovers}"
        shutil.rmtree(local.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """The sample photos, one per shard (absolute paths: the job runs in a copy of the working dir), as a
    comma-separated list of two brace patterns."""
    out = tmp_path_factory.mktemp("cluster_shards")
    shard_set = write_shards(photo_samples(), out, "one", 1, log=lambda *_: None)
    assert len(shard_set.shards) == 7
    return f"{out}/one-{{000000..000003}}.tar,{out}/one-{{000004..000006}}.tar"


def submit(cluster: LocalCluster, job_id: str, *job_args: str) -> list[str]:
    """The ``ray job submit --working-dir .`` command line of one jobs.attribute run."""
    return [str(BIN / "ray"), "job", "submit", "--address", cluster.address, "--working-dir", ".",
            "--submission-id", job_id, "--", "python", "-m", "jobs.attribute", *job_args]


def check_exactly_once(out: Path, methods: int, targets: int) -> int:
    """Every (sample, method, target) once: the row count, the keys, and no duplicate triple."""
    table = read_table(str(out))
    triples = list(zip(table.column("key").to_pylist(), table.column("method").to_pylist(),
                       table.column("target").to_pylist()))
    samples = photo_samples()
    assert len(triples) == len(set(triples)) == len(samples) * methods * targets
    assert sorted({k for k, _, _ in triples}) == sorted(s.key for s in samples)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["summary"]["maps_written"] == len(triples)
    assert not [p for p in (out / "_staging").rglob("*") if p.is_file()]
    return len(triples)


@pytest.mark.slow  # ~100 s: a second raylet, a submitted job, a node killed; `make test-slow`
def test_job_submit_on_two_nodes_and_a_node_killed(cluster, shards, tmp_path):
    samples = len(photo_samples())
    common = ["--shards", shards, "--model", "efficientnet_lite0", "--weights", "imagenet", "--batch-size", "1",
              "--cpus-per-worker", "1", "--device", "cpu"]

    # 1. a plain job through `ray job submit --working-dir .`
    start = time.perf_counter()
    first = subprocess.run(submit(cluster, f"xai-{uuid.uuid4().hex[:6]}", *common, "--methods", "saliency,gbp",
                                  "--workers", "1", "--out", str(tmp_path / "plain")),
                           cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=600)
    plain_seconds = time.perf_counter() - start
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
    assert "succeeded" in first.stdout.lower()
    assert f"[{samples}/{samples}] committed" in first.stdout
    assert f"done: {samples} images, {2 * samples} maps, 0 errors" in first.stdout
    plain_maps = check_exactly_once(tmp_path / "plain", methods=2, targets=1)

    # 2. a second job with two actors (Ray Data spreads them: one per node); the second node's raylet is SIGKILLed
    # once the first shard is committed, taking its actor, tasks and objects with it
    out = tmp_path / "killed"
    job_id = f"xai-{uuid.uuid4().hex[:6]}"
    start = time.perf_counter()
    log_path = tmp_path / "killed_job.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(submit(cluster, job_id, *common, "--methods", "tr_gbp,gbp", "--targets", "top5",
                                       "--workers", "2", "--out", str(out)),
                                cwd=REPO, env=cluster.env, stdout=log, stderr=subprocess.STDOUT)
    try:
        raylet = cluster.second_raylet()
        deadline = time.time() + 400
        while not list((out / "_commits").glob("*.json")):
            assert proc.poll() is None, f"the job ended before the node could be killed: {log_path.read_text()}"
            assert time.time() < deadline, "no shard committed within 400 s"
            time.sleep(0.1)
        on_second = cluster.workers_on(raylet)
        committed_at_kill = len(list((out / "_commits").glob("*.json")))
        os.kill(raylet.pid, signal.SIGKILL)
        killed_after = time.perf_counter() - start
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_seconds = time.perf_counter() - start
    text = log_path.read_text()
    assert proc.returncode == 0, text[-4000:]
    assert committed_at_kill < samples, "the job was over before the kill"
    assert any("AttributionWorker" in title for title in on_second), f"no actor on the killed node: {on_second}"
    assert "Raylet is terminated" in text  # the driver saw the node die, Ray retried, and the job still finished:
    assert re.search(r"will be retried|recover \d+ lost objects", text)
    assert re.search(rf"\[{samples}/{samples}\] committed", text)
    assert f"done: {samples} images, {10 * samples} maps, 0 errors" in text
    killed_maps = check_exactly_once(out, methods=2, targets=5)
    assert cluster.alive_nodes() == 1  # the GCS saw the second node die
    retries = [line.strip()[:220] for line in text.splitlines()
               if re.search(r"died|dead|restart|retried|lost|terminated", line, re.I) and "state-dump" not in line]
    print(f"\nplain job: {plain_maps} maps in {plain_seconds:.1f} s; job 2: second node's raylet killed "
          f"{killed_after:.1f} s in ({committed_at_kill}/{samples} shards committed; on that node: {on_second}); "
          f"{killed_maps} maps, 0 duplicates, in {killed_seconds:.1f} s")
    print("job log lines about the failure:\n  " + "\n  ".join(retries[:12]))


def test_cluster_yaml_passes_rays_own_validation():
    """cluster.yaml through the autoscaler's schema validation and default filling; one Ray version everywhere:
    the docker image, the nodes' setup command, the `cluster` extra and the Ray installed here."""
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    prepared = prepare_config(config)  # what `ray up` does before it talks to the cloud provider
    validate_config(prepared)  # the JSON schema of ray/autoscaler/ray-schema.json, and Ray's own checks
    types = prepared["available_node_types"]
    assert types[prepared["head_node_type"]]["resources"] == {"CPU": 0}
    assert any(t.get("resources", {}).get("GPU", 0) >= 1 for t in types.values())
    image_version = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py\d+-gpu", config["docker"]["image"]).group(1)
    setup = " ".join(config["setup_commands"])
    assert f"=={image_version}" in setup
    pyproject = (REPO / "pyproject.toml").read_text()
    cluster_extra = re.search(r"^cluster = (\[.*\])$", pyproject, re.M).group(1)
    assert f"ray[default]=={image_version}" in cluster_extra
    assert ray.__version__ == image_version, "the cluster's Ray must equal the client's"


def test_cluster_yaml_validation_catches_a_typo():
    """The validation is real: a misspelt key of a node type is rejected the way `ray up` would reject it."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    worker = config["available_node_types"]["gpu_worker"]
    worker["resorces"] = worker.pop("resources")
    with pytest.raises(jsonschema.ValidationError, match="resorces"):
        validate_config(prepare_config(config))
