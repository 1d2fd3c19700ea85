"""Where the actors run: a GPU actor computes on its GPU or fails to start with one line (never a silent CPU run),
GPUs that can never come fail before any work, the pool is sized for the cluster (also for fractional GPUs and an
autoscaler's limit), and an actor that dies in its constructor is one error line and a failed manifest."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attribution.errors import AttributionError
from jobs import common
from jobs.common import JobError, actor_resources, check_gpu_request
from workers.device import resolve_device

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ workers.device
def test_cpu_device_is_taken_as_asked():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cpu", "bf16") == torch.device("cpu")


def test_cuda_without_a_gpu_is_one_line_naming_torch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(AttributionError) as err:
        resolve_device("cuda")
    text = str(err.value)
    assert "\n" not in text and "sees no GPU" in text and torch.__version__ in text
    assert "CUDA_VISIBLE_DEVICES=''" in text and "--device cpu" in text


def test_bf16_refused_on_a_gpu_without_bf16_tensor_cores(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Tesla T4")
    capability = {"value": (7, 5)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: capability["value"])
    with pytest.raises(AttributionError, match=r"bf16 .*Tesla T4 has 7\.5: use fp16"):
        resolve_device("cuda", "bf16")
    for precision in ("fp32", "tf32", "fp16"):  # what such a GPU has
        assert resolve_device("cuda", precision) == torch.device("cuda")
    capability["value"] = (8, 0)  # A100 and newer
    assert resolve_device("cuda", "bf16") == torch.device("cuda")


def test_a_working_device_is_left_alone_and_a_lost_one_ends_the_process(monkeypatch):
    from workers import device

    assert device.device_is_healthy(torch.device("cpu"))
    device.exit_if_device_lost(torch.device("cpu"), "some failure")  # the CPU works: returns

    class Exited(Exception):
        pass

    def exit_(code):
        raise Exited(code)

    monkeypatch.setattr(device, "device_is_healthy", lambda _device: False)
    monkeypatch.setattr(device.os, "_exit", exit_)
    reason = "CUDA error: an illegal memory access was encountered"
    with pytest.raises(device.DeviceLostError, match=r"^cuda on .* stopped working \(CUDA error: an illegal"):
        device.exit_if_device_lost(torch.device("cuda"), reason)  # not in a Ray actor: an exception for the caller
    import ray

    class Context:
        was_current_actor_reconstructed = False

        def get_actor_id(self):
            return "an actor"

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_runtime_context", Context)
    with pytest.raises(Exited) as err:  # a first loss in an actor: the process ends, so Ray starts a new one
        device.exit_if_device_lost(torch.device("cuda"), reason)
    assert err.value.args == (device.DEVICE_LOST_EXIT_CODE,)
    Context.was_current_actor_reconstructed = True
    with pytest.raises(device.DeviceLostError, match="stopped working again after the actor was restarted"):
        device.exit_if_device_lost(torch.device("cuda"), reason)


# ------------------------------------------------------------------------------------- jobs.common: the pool
@pytest.fixture
def cluster(monkeypatch):
    """A stand-in for the connected cluster: its resources now and its autoscaler's GPU limit (None: unknown)."""
    import ray

    state = {"resources": {"CPU": 2.0}, "most": None}
    monkeypatch.setattr(ray, "cluster_resources", lambda: dict(state["resources"]))
    monkeypatch.setattr(common, "most_cluster_gpus", lambda: state["most"])
    return state


def test_pool_without_gpus_leaves_a_cpu_to_the_pipeline(cluster):
    cluster["resources"] = {"CPU": 8.0}
    assert actor_resources(None, None, None, None) == (0, 1, 7, 8)


def test_one_actor_per_gpu_and_two_per_gpu_at_half_a_gpu(cluster):
    cluster["resources"] = {"CPU": 16.0, "GPU": 4.0}
    assert actor_resources(None, None, None, None) == (1, 4, 1, 32)
    assert actor_resources(0.5, None, None, None)[:2] == (0.5, 8)
    assert actor_resources(0.5, 3, 2, 64) == (0.5, 3, 2, 64)  # what the user says wins


def test_device_cpu_asks_for_no_gpu(cluster):
    cluster["resources"] = {"CPU": 16.0, "GPU": 4.0}
    assert actor_resources(None, None, None, None, device="cpu") == (0, 1, 15, 8)


def test_an_autoscaler_s_gpus_count_before_they_exist(cluster):
    """A cluster like cluster.yaml (CPU: 0 head, GPU nodes from 0 on demand) has no GPU at submission; where its
    autoscaler reports how many it may start, the pool is sized for those."""
    cluster["resources"], cluster["most"] = {"CPU": 0.0}, 8.0
    assert actor_resources(None, None, None, None) == (1, 8, 1, 32)


def test_gpus_that_can_never_come_fail_before_any_work(cluster):
    cluster["resources"] = {"CPU": 2.0}
    with pytest.raises(JobError, match=r"^1 actor x 1 GPU asked for, but this machine's Ray has 0 GPU"):
        check_gpu_request(1, 1, embedded=True)
    cluster["most"] = 4.0
    with pytest.raises(JobError, match="autoscaler can bring up at most 4 GPU"):
        check_gpu_request(1, 8, embedded=False)
    assert check_gpu_request(1, 4, embedded=False).startswith("waiting for GPUs: 4 actors x 1 GPU")


def test_connected_cluster_without_gpus_is_told_so(cluster):
    cluster["resources"] = {"CPU": 0.0}
    assert "--gpus-per-worker 1 --workers N" in check_gpu_request(0, 1, embedded=False)
    assert "waiting for GPUs" in check_gpu_request(1, 2, embedded=False)  # no autoscaler limit known: it may come
    assert check_gpu_request(0, 1, embedded=True) is None  # a laptop: CPU actors are what it has
    assert check_gpu_request(0, 1, embedded=False, cpu_asked=True) is None  # --device cpu / --gpus-per-worker 0
    cluster["resources"] = {"CPU": 8.0, "GPU": 2.0}
    assert check_gpu_request(1, 2, embedded=True) is None
    assert check_gpu_request(0.5, 4, embedded=False) is None


def test_gpu_actors_compute_on_cuda_and_cpu_actors_on_the_cpu(cluster, monkeypatch, capsys):
    """The actors' copy of the config names their device: "cuda" where they hold a GPU (before: None, which an actor
    whose torch sees no GPU turned into a silent CPU run), "cpu" where not; the caller's config is left alone."""
    from jobs import scaffold
    from jobs.scaffold import ActorJobSettings, actor_plan
    from workers.attribution_worker import WorkerConfig

    monkeypatch.setattr(scaffold, "ray_is_embedded", lambda: False)
    mine = WorkerConfig(model="resnet18")
    cluster["resources"] = {"CPU": 16.0, "GPU": 2.0}
    gpus, workers, cpus, batch, config = actor_plan(ActorJobSettings(), mine)
    assert (gpus, workers, cpus, batch, config.device, config.threads) == (1, 2, 1, 32, "cuda", 1)
    assert mine.device is None and mine.threads is None
    assert capsys.readouterr().out == "actors: 2 x (1 GPU, 1 CPU, 1 threads) on cuda, batches of 32\n"
    forced = actor_plan(ActorJobSettings(quiet=True), WorkerConfig(model="resnet18", device="cpu"))
    assert forced[0] == 0 and forced[4].device == "cpu"  # --device cpu holds no GPU
    cluster["resources"] = {"CPU": 4.0}
    gpus, workers, cpus, batch, config = actor_plan(ActorJobSettings(), mine)
    assert (gpus, workers, cpus, batch, config.device, config.threads) == (0, 1, 3, 8, "cpu", 3)
    assert capsys.readouterr().out.splitlines() == [
        "warning: the cluster has no GPU now, so the actors run on CPUs; for GPU nodes that an autoscaler starts on "
        "demand pass --gpus-per-worker 1 --workers N", "actors: 1 x (0 GPU, 3 CPU, 3 threads) on cpu, batches of 8"]


# ------------------------------------------------------------------------------------------ end to end (CLI)
@pytest.mark.slow
def test_gpu_actor_whose_torch_sees_no_gpu_fails_in_one_line(tmp_path):
    """Ray gives the actor a GPU (a declared one, hidden from torch): before, the actor silently ran the job on
    the CPU and the manifest said "complete". Now the job stops with one line naming torch and the manifest says
    why. Slow (~25 s: its own Ray, with a GPU declared); the device choice itself is tested above."""
    from attribution.data.sample_sets import photo_samples
    from attribution.data.shards import write_shards

    shards = write_shards(photo_samples()[:2], tmp_path / "shards", "photos", 2, log=lambda *_: None)
    out = tmp_path / "maps"
    # the workers see no GPU on any machine: Ray leaves CUDA_VISIBLE_DEVICES alone (NOSET) and the job's
    # runtime environment empties it
    script = ("import sys, ray; ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False, "
              "object_store_memory=256 * 2**20, runtime_env={'env_vars': {'CUDA_VISIBLE_DEVICES': ''}}); "
              "from jobs.attribute import main; sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1", "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", script, "--shards", shards.pattern, "--model", "resnet18",
                             "--methods", "saliency", "--out", str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: an actor could not start: device cuda asked for, but torch "), last
    assert "sees no GPU" in last
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["failure"] == last.removeprefix("error: ")
    assert "actors: 1 x (1 GPU, 1 CPU, 1 threads) on cuda" in result.stdout


def test_hardware_record_keeps_the_largest_cluster_seen(cluster):
    """An autoscaling cluster grows and shrinks during a run; the manifest keeps the most it had."""
    cluster["resources"] = {"CPU": 16.0, "GPU": 4.0, "accelerator_type:A10G": 1.0}
    first = common.cluster_hardware()
    assert first == {"cpus": 16.0, "gpus": 4.0, "gpu_types": ["A10G"]}
    cluster["resources"] = {"CPU": 8.0, "GPU": 2.0, "accelerator_type:L4": 1.0}
    assert common.cluster_hardware(first) == {"cpus": 16.0, "gpus": 4.0, "gpu_types": ["A10G", "L4"]}
    cluster["resources"] = {"CPU": 2.0}
    assert common.cluster_hardware() == {"cpus": 2.0, "gpus": 0.0, "gpu_types": []}
