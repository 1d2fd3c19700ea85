"""bench.gpu_check's CPU dry run (--tiny): the code a lent GPU will run, so it cannot rot unnoticed.

Speed is measured, not asserted: the checks are that every section runs, that gpu_check.json holds every key
issue 13 names for every registry method with a real value, that a failing section is recorded while the
others still run, and that a spent time budget skips sections but still writes the JSON.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from attribution.methods import REGISTRY
from bench import gpu_check, gpu_plan

CAPTUM_CORE = ("saliency", "gbp", "gradcam")  # Captum's Saliency, GuidedBackprop, LayerGradCam


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def tiny(ray_session, tmp_path_factory) -> dict:
    """One tiny CPU run of every section and every method (no budget: a loaded machine must not skip units)."""
    out = tmp_path_factory.mktemp("gpu_check")
    returned = gpu_check.main(["--device", "cpu", "--tiny", "--methods", "all", "--budget-s", "1e9",
                               "--out", str(out)])
    written = json.loads((out / gpu_check.JSON_NAME).read_text())
    assert written["sections"] == returned["sections"]
    return written


def test_every_section_runs(tiny):
    for name in gpu_check.SECTIONS:
        status = tiny["sections"][name]
        assert status["status"] == "ok", f"section {name}: {status}"
    env = tiny["environment"]
    assert env["versions"]["torch"] and "cudnn_version" in env and env["device"] == "cpu", env


def test_agreement_of_every_method(tiny):
    for name in REGISTRY:
        entry = tiny["methods"][name]
        # cpu vs cpu: the same computation twice, so bit-identical
        assert entry["max_rel_diff_vs_cpu"] == 0.0, f"{name}: {entry['agreement']}"
        assert "options" in entry["agreement"], name
    assert tiny["methods"]["rise"]["agreement"]["options"]["masks"] == gpu_check.CHEAP_OPTIONS["rise"]["masks"]


def test_throughput_of_every_method_and_precision(tiny):
    plan = tiny["settings"]["plan"]
    model = plan["models"][0]
    for name in REGISTRY:
        entry = tiny["methods"][name]
        per_model = entry["models"][model]
        for precision in plan["precisions"]:
            if not gpu_plan.allows(name, precision):
                assert precision in per_model["refused"], f"{name} {precision}: refusal not recorded"
                continue
            for where, values in (("methods", entry), (f"models.{model}", per_model)):
                assert positive(values["images_per_second"].get(precision)), \
                    f"{name} {precision} ({where}): {per_model['errors'].get(precision)}"
                assert positive(values["floor_images_per_second"].get(precision)), f"{name} {precision} floor"
            assert positive(per_model["fraction_of_floor"][precision]), f"{name} {precision}"
        assert per_model["floor_passes"], name
    for name in CAPTUM_CORE:
        entry = tiny["methods"][name]
        assert entry["captum"].startswith("captum."), name
        assert positive(entry["captum_images_per_second"]["fp32"]), f"{name}: {entry['models'][model]}"


def test_pipeline_fields(tiny):
    pipe = tiny["pipeline"]
    assert pipe["samples"] == pipe["images"] == tiny["settings"]["plan"]["pipeline_images"] and pipe["errors"] == 0, \
        pipe
    for key in ("images_per_second", "bare_loop_images_per_second", "steady_images_per_second", "ratio_to_bare"):
        assert positive(pipe[key]), f"pipeline.{key} = {pipe.get(key)}"
    for key in ("gpu_busy_fraction", "peak_gpu_memory_bytes"):  # measured on CUDA only
        assert key in pipe and pipe[key] is None, f"pipeline.{key} = {pipe.get(key)} on the CPU"
    assert pipe["maps_written"] == pipe["images"] * 5 * len(pipe["methods"])  # top-5 targets
    assert positive(pipe["plan_images_per_second"]) and positive(pipe["plan_ratio_to_steady"])
    assert set(pipe["plan_steps_seconds_per_image"]) == set(pipe["methods"])
    assert pipe["plan_output_bytes_ratio"] == pytest.approx(1, rel=0.25)  # the same maps, encoded alike


def test_evaluate_fields(tiny):
    ev = tiny["evaluate"]
    assert ev["samples"] == ev["images"] and ev["errors"] == 0 and ev["maps"] == "the pipeline section's maps", ev
    for key in ("images_per_second", "worker_images_per_second", "floor_images_per_second",
                "floor_forwards_per_second", "ratio_to_floor"):
        assert positive(ev[key]), f"evaluate.{key} = {ev.get(key)}"
    assert ev["forwards_per_image"] == 2 * 11 + 21  # MoRF + LeRF at 0..100 % in 10 steps, insertion 20 + 1


def test_failing_section_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(gpu_check, "section_agreement", boom)
    report = gpu_check.main(["--device", "cpu", "--tiny", "--sections", "agreement,throughput",
                             "--methods", "saliency", "--precisions", "fp32", "--budget-s", "1e9",
                             "--out", str(tmp_path)])
    written = json.loads((tmp_path / gpu_check.JSON_NAME).read_text())
    assert written["sections"]["agreement"] == {**report["sections"]["agreement"]}
    assert written["sections"]["agreement"]["status"] == "error"
    assert written["sections"]["agreement"]["error"] == "RuntimeError: boom"
    assert written["sections"]["throughput"]["status"] == "ok", written["sections"]
    assert positive(written["methods"]["saliency"]["images_per_second"]["fp32"])
    assert written["sections"]["pipeline"]["note"] == "not in --sections"


def test_spent_budget_skips_sections_but_writes_the_json(tmp_path):
    gpu_check.main(["--device", "cpu", "--tiny", "--budget-s", "0", "--out", str(tmp_path)])
    written = json.loads((tmp_path / gpu_check.JSON_NAME).read_text())
    for name in gpu_check.SECTIONS:
        assert written["sections"][name]["status"] == "skipped", written["sections"][name]
        assert "time budget" in written["sections"][name]["note"]
    assert "time budget" in written["pipeline"]["skipped"] and "time budget" in written["evaluate"]["skipped"]


def test_ray_data_log_of_the_pipeline_sections(tiny, tmp_path):
    """bench.ray_data_log on the Ray Data log this session's pipeline and evaluate sections just wrote (the folder
    named as the run prints it): every operator after the input, with its tasks and their times."""
    import ray

    from bench import ray_data_log

    folder = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "ray-data"
    run_log = tmp_path / "run.log"
    run_log.write_text(f"… INFO streaming_executor.py:215 -- Starting execution … Full logs are in {folder}\n")
    assert ray_data_log.main(["--from-log", str(run_log), "--out", str(tmp_path / "ops.json")]) == 0
    rows = json.loads((tmp_path / "ops.json").read_text())["operators"]
    names = {r["operator"] for r in rows}
    for stage in ("ReadWebDatasetShards", "MapBatches(decode_batch)", "MapBatches(ProbeWorker)",
                  "MapBatches(write_parts)", "MapBatches(EvaluateWorker)", "MapBatches(write_metric_parts)"):
        assert any(stage in name for name in names), (stage, names)
    assert not any(name.startswith("InputDataBuffer") for name in names)
    workers = [r for r in rows if "ProbeWorker" in r["operator"]]  # this session's gpu_check runs
    assert all(w["tasks"] >= 1 and 0 < w["task_mean_s"] <= w["task_max_s"] and w["max_uss_bytes"] > 2 ** 20
               for w in workers)
    assert tiny["pipeline"]["images"] in [w["rows_in"] for w in workers]


def test_ray_data_log_fields_from_a_logged_line(tmp_path):
    """The fields are picked out of Ray 2.60's logged repr, object reprs and all (values from a real log)."""
    from bench.ray_data_log import operator_metrics

    log = tmp_path / "ray-data.log"
    log.write_text(
        "2026-12-03 13:49:34,017\tINFO streaming_executor.py:216 -- Execution plan of Dataset ds_7: "
        "InputDataBuffer[Input] -> ActorPoolMapOperator[MapBatches(W)]\n"
        "2026-12-03 13:49:42,157\tDEBUG streaming_executor.py:589 -- Operator ActorPoolMapOperator[MapBatches(W)] "
        "completed. Operator Metrics:\n"
        "{'average_task_scheduling_time_s': 0.1354205075022037, 'average_task_output_backpressure_time_s': 0.0, "
        "'average_task_block_gen_and_ser_time_s': 0.12062187424817239, 'op_task_duration_stats': {'num_samples': 4, "
        "'mean': 0.27864404449974245, 'variance': 0.0148, 'min': 0.193, 'max': 0.457761601999664, 'p25': None}, "
        "'max_uss_bytes': {'num_samples': 4, 'mean': 491503616.0, 'max': 492085248, 'p99': None}, "
        "'num_row_inputs_received': 32, 'task_completion_time': (samples: 4, avg: 0.28), "
        "'bytes_task_outputs_generated': 4076716, 'cpu_usage': 0}\n")
    (row,) = operator_metrics(log)
    assert row == {"dataset": "ds_7", "operator": "ActorPoolMapOperator[MapBatches(W)]", "tasks": 4.0,
                   "task_mean_s": 0.27864404449974245, "task_max_s": 0.457761601999664,
                   "scheduling_mean_s": 0.1354205075022037, "backpressure_mean_s": 0.0,
                   "block_gen_mean_s": 0.12062187424817239, "rows_in": 32.0, "bytes_out": 4076716.0,
                   "max_uss_bytes": 492085248.0}
