"""jobs.attribute end to end on embedded Ray: exactly-once rows, maps equal to direct calls, NPZ = Parquet,
resume after a kill, an actor crash, corrupt samples, and one-line CLI errors."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from attribution import models
from attribution.images import decode_sample
from attribution.methods import attribute
from jobs.attribute import AttributeConfig, run
from jobs.common import NON_TTY_PROGRESS_INTERVAL_S, JobError, log_progress_briefly, ray_failure_line
from attribution.data.sample_sets import photo_samples
from attribution.data.shards import write_shards
from schemas.attributions import validate_attributions
from workers.attribution_worker import WorkerConfig
from workers.sink import OutputStore, maps_of, read_table
from workers.testing import CrashOnceWorker, LostDeviceWorker
from tests.tolerances import assert_maps_agree, network_atol, unit_roundoff

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory) -> str:
    """The real sample photos in shards of 3 (>= 2 shards)."""
    out = tmp_path_factory.mktemp("shards")
    shard_set = write_shards(photo_samples(), out, "photos", 3, log=lambda *_: None)
    assert len(shard_set.shards) >= 2
    return shard_set.pattern


def lite0_config(shards: str, out: Path, methods=("gbp", "a_fmi"), targets="top5", **kw) -> AttributeConfig:
    worker = WorkerConfig(model="efficientnet_lite0", weights="imagenet", methods=list(methods), targets=targets,
                          **kw.pop("worker", {}))
    return AttributeConfig(shards=[shards], out=str(out), worker=worker, batch_size=4, quiet=True, **kw)


def key_triples(table) -> list[tuple]:
    return list(zip(table.column("key").to_pylist(), table.column("method").to_pylist(),
                    table.column("target").to_pylist()))


@pytest.fixture(scope="module")
def full_run(ray_session, photo_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("maps")
    summary = run(lite0_config(photo_shards, out, format="both", worker={"map_dtype": "float16"}))
    return out, summary


def test_every_sample_method_target_exactly_once(full_run, photo_shards):
    out, summary = full_run
    table = read_table(str(out))
    samples = photo_samples()
    triples = key_triples(table)
    assert len(triples) == len(set(triples)) == len(samples) * 2 * 5
    assert {k for k, _, _ in triples} == {s.key for s in samples}
    assert summary["samples"] == len(samples) and summary["errors"] == 0
    assert summary["maps_written"] == table.num_rows
    for key in {k for k, _, _ in triples}:
        rows = table.filter(table.column("key").to_numpy(zero_copy_only=False) == key)
        top5 = rows.column("top5")[0].as_py()
        assert sorted(rows.column("target").to_pylist()) == sorted(top5 * 2)
        assert sorted(rows.column("target_rank").to_pylist()) == sorted(list(range(5)) * 2)
    for path in (out / "attributions").rglob("*.parquet"):
        validate_attributions(pq.read_table(path), 224, "float16")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert all(s["status"] == "committed" for s in manifest["shards"].values())
    import ray  # what the times were measured on: the session's Ray (2 CPUs; GPUs where the machine has them)
    assert manifest["hardware"]["cpus"] == 2 and manifest["hardware"]["gpus"] == ray.cluster_resources().get("GPU", 0)


def test_stored_maps_equal_direct_calls(full_run):
    out, _ = full_run
    table = read_table(str(out))
    spec = models.load("efficientnet_lite0", weights="imagenet")
    stored = maps_of(table)
    by_key = {s.key: s for s in photo_samples()}
    checked = 0
    for key in sorted(by_key)[:3]:
        sample = by_key[key]
        decoded = decode_sample(sample.image(), str(sample.meta["label"]).encode(),
                                json.dumps(sample.meta).encode(), spec.preprocessing)
        image = spec.preprocessing.normalise(torch.from_numpy(decoded.pixels).float()[None] / 255.0)
        for method in ("gbp", "a_fmi"):
            mask = [(k == key and m == method) for k, m, _ in key_triples(table)]
            idx = np.flatnonzero(mask)
            targets = torch.tensor([table.column("target")[int(i)].as_py() for i in idx])
            direct = attribute(method, spec, image.expand(len(idx), -1, -1, -1), targets).numpy()
            scale = np.abs(direct).max(axis=(1, 2))
            # float16 storage of map / max|map| rounds to u16 = 2^-11 of the scale; the actor's batch and thread
            # count differ from this call's, so add the rounding bound of a forward + backward pass; guided ReLU
            # masks may flip where an input is within rounding of 0, hence the robust criterion.
            atol = scale * unit_roundoff(torch.float16) + network_atol(spec.module, 1.0, passes=2) * scale
            assert_maps_agree(stored[idx], direct, atol, what=f"{key} {method}")
            checked += len(idx)
    assert checked == 30


def test_npz_agrees_with_parquet(full_run):
    out, _ = full_run
    table = read_table(str(out))
    store = OutputStore(str(out))
    parquet = {t: m for t, m in zip(key_triples(table), maps_of(table))}
    npz_files = store.committed_files("npz")
    assert {f.split("/")[1] for f in npz_files} == set(store.committed())  # every shard has its NPZ part(s)
    seen = 0
    for rel in npz_files:
        with np.load(store.path(rel)) as data:
            for i in range(len(data["key"])):
                triple = (str(data["key"][i]), str(data["method"][i]), int(data["target"][i]))
                np.testing.assert_array_equal(data["map"][i].astype(np.float32) * data["map_scale"][i],
                                              parquet[triple])
                seen += 1
    assert seen == table.num_rows


def test_rerun_skips_committed_and_overwrite_recomputes(full_run, photo_shards):
    out, _ = full_run
    before = {p: p.stat().st_mtime_ns for p in (out / "attributions").rglob("*.parquet")}
    again = run(lite0_config(photo_shards, out, format="both", worker={"map_dtype": "float16"}))
    assert again["samples"] == 0 and again["shards_committed"] == again["shards"]
    assert {p: p.stat().st_mtime_ns for p in (out / "attributions").rglob("*.parquet")} == before
    with pytest.raises(JobError, match="different methods"):
        run(lite0_config(photo_shards, out, methods=("saliency",), format="both", worker={"map_dtype": "float16"}))


def test_one_dataset_per_shard_gives_the_same_maps(ray_session, full_run, photo_shards, tmp_path):
    """--shards-per-dataset 1: each shard runs as its own Ray dataset (its own actor pool) and the run is the same:
    every (sample, target) of gbp once, the maps of the one-dataset run within float16 storage and the rounding of
    a differently composed actor batch (a batch no longer spans two shards)."""
    out, _ = full_run
    summary = run(lite0_config(photo_shards, tmp_path, methods=("gbp",), shards_per_dataset=1,
                               worker={"map_dtype": "float16"}))
    assert summary["shards_committed"] == summary["shards"] >= 2 and summary["samples"] == len(photo_samples())
    one = read_table(str(out), methods=["gbp"]).sort_by([("key", "ascending"), ("target", "ascending")])
    per_shard = read_table(str(tmp_path)).sort_by([("key", "ascending"), ("target", "ascending")])
    assert key_triples(per_shard) == key_triples(one)
    reference = maps_of(one)
    scale = np.abs(reference).max(axis=(1, 2))
    spec = models.load("efficientnet_lite0", weights="imagenet")
    atol = 2 * scale * unit_roundoff(torch.float16) + network_atol(spec.module, 1.0, passes=2) * scale
    assert_maps_agree(maps_of(per_shard), reference, atol, what="gbp, one dataset per shard")


@pytest.mark.parametrize("worker_cls, fault", [
    (CrashOnceWorker, {"crash_marker": "MARKER", "crash_on_call": 2}),
    # the device stops working mid-run (as a CUDA context does after an illegal memory access): the actor ends
    # itself instead of turning every later sample into error rows
    (LostDeviceWorker, {"marker": "MARKER", "lose_on_call": 2}),
], ids=["crash", "lost_device"])
def test_actor_that_dies_once_loses_nothing(ray_session, photo_shards, tmp_path, worker_cls, fault):
    """Ray restarts the actor and the batch is redone: every row exactly once, no error row."""
    config = lite0_config(photo_shards, tmp_path / "out", methods=("saliency",), targets="top1")
    config.batch_size = 1
    marker = tmp_path / "fault"
    summary = run(config, worker_cls, {k: str(marker) if v == "MARKER" else v for k, v in fault.items()})
    assert marker.exists(), "the fault was not injected"
    triples = key_triples(read_table(str(tmp_path / "out")))
    assert sorted(k for k, _, _ in triples) == sorted(s.key for s in photo_samples())
    assert len(triples) == len(set(triples))
    assert summary["errors"] == 0


def test_gpu_lost_again_after_a_restart_stops_the_job_in_one_line(ray_session, photo_shards, tmp_path):
    """Lost again in the restarted actor (a broken GPU, a fault that recurs): the job stops, with one line in the
    manifest naming the device and the first failure, rather than restarting the actor forever."""
    config = lite0_config(photo_shards, tmp_path / "out", methods=("saliency",), targets="top1")
    config.batch_size = 1
    with pytest.raises(Exception) as err:
        run(config, LostDeviceWorker, {"marker": str(tmp_path / "lost"), "lose_on_call": 1, "again": True})
    line = ray_failure_line(err.value)
    assert line is not None and line.startswith("a Ray task stopped: cpu on ") and "\n" not in line
    assert line.endswith("stopped working again after the actor was restarted (saliency: CUDA error: an illegal "
                         "memory access was encountered)")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["failure"] == line


def test_killed_run_resumes_to_the_same_result(ray_session, tmp_path):
    """Kill the job (process group, SIGKILL) after its first commit; a rerun completes; result = clean run."""
    # One sample per shard and the slowest method: after the first commit, six shards (> 1 s) are still to do.
    photo_shards = write_shards(photo_samples(), tmp_path / "shards", "one", 1, log=lambda *_: None).pattern
    args = ["--shards", photo_shards, "--model", "efficientnet_lite0", "--weights", "imagenet",
            "--methods", "tr_gbp", "--targets", "top1", "--batch-size", "1", "--map-dtype", "float32"]
    interrupted = tmp_path / "interrupted"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.attribute", *args, "--out", str(interrupted)],
                            cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not list((interrupted / "_commits").glob("*.json")):
            assert proc.poll() is None, "the job ended before it could be interrupted"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    committed_before = OutputStore(str(interrupted)).committed()
    shards_total = len(json.loads((interrupted / "manifest.json").read_text())["shards"])
    assert 1 <= len(committed_before) < shards_total
    config = AttributeConfig(shards=[photo_shards], out=str(interrupted), batch_size=1, quiet=True,
                             worker=WorkerConfig(model="efficientnet_lite0", weights="imagenet",
                                                 methods=["tr_gbp"], targets="top1", map_dtype="float32"))
    resumed = run(config)
    assert resumed["samples"] == len(photo_samples()) - sum(r["samples"] for r in committed_before.values())
    clean = tmp_path / "clean"
    run(AttributeConfig(**{**config.__dict__, "out": str(clean)}))
    a, b = read_table(str(interrupted)), read_table(str(clean))
    order_a, order_b = np.argsort(key_triples_str(a)), np.argsort(key_triples_str(b))
    assert [key_triples(a)[i] for i in order_a] == [key_triples(b)[i] for i in order_b]
    np.testing.assert_allclose(maps_of(a)[order_a], maps_of(b)[order_b], rtol=1e-5, atol=1e-7)
    assert not list((interrupted / "_staging").rglob("*.parquet"))


def key_triples_str(table) -> list[str]:
    return [f"{k}|{m}|{t}" for k, m, t in key_triples(table)]


def _raw_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _jpeg(mode: str = "RGB", fmt: str = "JPEG", size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color=100 if mode == "L" else (120, 30, 200, 10)[:len(mode)]).save(buffer, fmt)
    return buffer.getvalue()


def _sample(key: str, image: bytes, label: int = 1, bboxes=((4, 4, 30, 30),), cls: bool = True,
            meta: bool = True) -> list[tuple[str, bytes]]:
    members = [(f"{key}.jpg", image)]
    if cls:
        members.append((f"{key}.cls", str(label).encode()))
    if meta:
        members.append((f"{key}.json", json.dumps({"key": key, "label": label, "width": 64, "height": 48,
                                                   "bboxes": [list(b) for b in bboxes]}).encode()))
    return members


def test_bad_samples_become_error_rows(ray_session, tmp_path):
    good = _jpeg()
    _raw_tar(tmp_path / "bad-000000.tar",
             _sample("ok_rgb", good) + _sample("ok_gray", _jpeg("L")) + _sample("ok_cmyk", _jpeg("CMYK"))
             + _sample("ok_png_in_jpg", _jpeg(fmt="PNG")) + _sample("corrupt", b"\xff\xd8garbage")
             + _sample("truncated_jpeg", good[: len(good) // 2]) + _sample("no_cls", good, cls=False)
             + _sample("no_json", good, meta=False) + _sample("box_outside", good, bboxes=((10, 10, 90, 40),)))
    whole = tmp_path / "whole.tar"
    _raw_tar(whole, _sample("cut_a", good) + _sample("cut_b", good) + _sample("cut_c", good))
    with tarfile.open(whole) as tar:
        cut = tar.getmember("cut_c.jpg").offset_data + 100  # inside the last sample's image
    (tmp_path / "bad-000001.tar").write_bytes(whole.read_bytes()[:cut])
    config = AttributeConfig(shards=[str(tmp_path / "bad-{000000..000001}.tar")], out=str(tmp_path / "out"),
                             quiet=True, batch_size=4, worker=WorkerConfig(
                                 model="resnet18", methods=["saliency", "gradcam"], targets="label"))
    summary = run(config)
    rows = read_table(str(tmp_path / "out"))
    errors = read_table(str(tmp_path / "out"), "errors").to_pylist()
    ok_keys = {"ok_rgb", "ok_gray", "ok_cmyk", "ok_png_in_jpg", "cut_a", "cut_b"}
    assert set(rows.column("key").to_pylist()) == ok_keys
    assert rows.num_rows == 2 * len(ok_keys)
    reasons = {(e["key"], e["stage"]): e["reason"] for e in errors}
    assert "undecodable image" in reasons[("corrupt", "decode")]
    assert "undecodable image" in reasons[("truncated_jpeg", "decode")]
    assert reasons[("no_cls", "decode")] == "missing .cls member"
    assert reasons[("no_json", "decode")] == "missing .json member"
    assert "outside the 64x48 image" in reasons[("box_outside", "decode")]
    assert "damaged tar" in reasons[("cut_c", "read")]
    assert "tar unreadable after 2 samples" in reasons[("", "read")]
    assert all(e["shard"] in ("bad-000000.tar", "bad-000001.tar") for e in errors)
    assert summary["shards_committed"] == 2 and summary["errors"] == len(errors) == 7


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.attribute", *args], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["--shards", "x.tar", "--model", "resnet18", "--methods", "lime", "--out", "o"],
     "error: unknown method 'lime'; known: saliency, gbp, gradcam, tr_gbp, a_fmi"),
    (["--shards", "x.tar", "--model", "alexnet", "--methods", "gbp", "--out", "o"], "error: unknown model 'alexnet'"),
    (["--shards", "/nonexistent/val-{000000..000003}.tar", "--model", "resnet18", "--methods", "gbp", "--out", "o"],
     "error: shard /nonexistent/val-000000.tar does not exist"),
    (["--shards", "/nonexistent/*.tar", "--model", "resnet18", "--methods", "gbp", "--out", "o"],
     "error: no shards match /nonexistent/*.tar"),
    (["--shards", "x.tar", "--model", "resnet18", "--methods", "gbp", "--out", "o", "--method-options", "[1]"],
     "error: --method-options must be a JSON object of objects"),
    (["--shards", "x.tar", "--model", "resnet18", "--methods", "gbp,a_fmi", "--out", "o",
      "--method-options", '{"a_fmi": {"refrence": "white"}}'],
     "error: method 'a_fmi' has no option 'refrence'; options: reference, seed, return_fmi"),
])
def test_cli_errors_are_one_line(args, message, capsys):
    from jobs.attribute import main
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err.strip()
    assert stderr.startswith(message), stderr
    assert len(stderr.splitlines()) == 1


def test_cli_error_from_a_real_process_has_no_traceback():
    result = run_cli("--shards", "/nonexistent/x.tar", "--model", "resnet18", "--methods", "gbp", "--out", "o")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: shard /nonexistent/x.tar does not exist"


def test_uri_paths_and_optional_columns(ray_session, tmp_path):
    """file:// URIs go through the same pyarrow filesystem layer as s3:// and gs://; --fmi and --layers fill
    their columns."""
    from attribution.data.sample_sets import synthetic_samples

    shard_set = write_shards(synthetic_samples(4), tmp_path / "shards", "syn", 2, log=lambda *_: None)
    config = AttributeConfig(shards=[f"file://{tmp_path}/shards/syn-{{000000..000001}}.tar"],
                             out=f"file://{tmp_path}/out", quiet=True, batch_size=2,
                             worker=WorkerConfig(model="efficientnet_lite0", weights="imagenet",
                                                 methods=["a_fmi", "tr_gbp"], targets="label", fmi=True,
                                                 layers=True, map_dtype="float32"))
    summary = run(config)
    assert summary["samples"] == shard_set.num_samples == 4 and summary["errors"] == 0
    table = read_table(f"file://{tmp_path}/out")
    rows = table.to_pylist()
    fmi_rows = [r for r in rows if r["method"] == "a_fmi"]
    layer_rows = [r for r in rows if r["method"] == "tr_gbp"]
    assert len(fmi_rows) == len(layer_rows) == 4
    assert all(len(r["fmi"]) == 1280 and r["layers"] is None for r in fmi_rows)
    names = [layer["name"] for layer in layer_rows[0]["layers"]]
    assert {"_fc", "input", "_conv_stem+_bn0", "_conv_head+_bn1"} <= set(names)
    stem = next(layer for layer in layer_rows[0]["layers"] if layer["name"] == "_conv_stem+_bn0")
    assert (stem["height"], stem["width"]) == (224, 224) and len(stem["values"]) == 224 * 224
    assert [r["target"] for r in fmi_rows] == [r["label"] for r in fmi_rows]


def test_progress_is_logged_briefly_without_a_terminal(monkeypatch):
    """Without a terminal Ray Data would log every operator every 10 s: only its total line stays, once a minute,
    and an interval the user set is kept."""
    import ray.data

    variable = "RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL"
    context = ray.data.DataContext.get_current()
    monkeypatch.setattr(context, "enable_operator_progress_bars", True)
    monkeypatch.delenv(variable, raising=False)
    log_progress_briefly()
    assert os.environ[variable] == str(NON_TTY_PROGRESS_INTERVAL_S) == "60"
    assert context.enable_operator_progress_bars is False
    monkeypatch.setenv(variable, "5")
    log_progress_briefly()
    assert os.environ[variable] == "5"

