"""bench.gpu_check's CPU dry run (--tiny): the code a lent GPU will run, so it cannot rot unnoticed.

Speed is measured, not asserted: the checks are that every section runs, that gpu_check.json holds every key
issue 13 names for every registry method with a real value, that a failing section is recorded while the
others still run, and that a spent time budget skips sections but still writes the JSON.
"""
from __future__ import annotations

import json
import math

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
