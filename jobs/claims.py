"""python -m jobs.claims: the papers' claims put to the test on the procedural benchmark and on the real Lite0.

    python -m jobs.claims --out runs/claims [--quick] [--val 300] [--train 3000] [--road-images 100] [--seed 0]

A documented chain of the existing jobs; every intermediate output stays under ``--out`` so each step can be
rerun or inspected on its own (reruns skip what is already there):

1. ``jobs.make_benchmark``: the benchmark (``bench/``) and its border-shortcut variant (``bench_shortcut/``);
2. ``jobs.train_benchmark_model``: ``bench_resnet``, ``bench_vgg`` and ``bench_vgg_plain`` on the benchmark (from
   scratch), ``bench_lite0`` fine-tuned from EfficientNet-Lite0's ImageNet weights (``TRAIN_OPTIONS``: the
   benchmark's stand-in for an ImageNet-trained CNN), ``bench_resnet`` on the shortcut variant (``models/*.pt``);
3. ``jobs.attribute`` → ``jobs.evaluate`` on the validation split for each model (saliency, gbp, gradcam,
   tr_gbp, a_fmi, top-5 maps), on the shortcut variant (top-1 maps, for IBD), with ``--targets label --fmi`` on
   train + val (FMI prototypes), and a_fmi/ig/deeplift with black, white and random references; MoRF/LeRF
   with black pixels and with ROAD's noisy linear imputation on the first ``road_images`` validation images (the
   references on the first ``reference_images``; both rounded up to whole shards of ``SHARD_SIZE`` = 50);
4. ``jobs.sanity`` (gbp, tr_gbp) for each model; the same on the real EfficientNet-Lite0 with the real photos;
5. ``jobs.report`` over everything, with the claims table on top.

Each claim is a comparison of measured numbers in the direction the paper states; the table prints both sides
and whether it holds. A claim that does not hold is a finding: the benchmark is never tuned to make one hold.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from jobs.claim_verdicts import (ARCHS, METHODS, REFERENCE_METHODS, REFERENCES, Claim, claims_markdown,
                                 evaluate_claims, write_claims)

LITE0 = "efficientnet_lite0"
# per-architecture training options: bench_lite0 is fine-tuned (ImageNet init, 3 epochs, peak lr 1e-3)
TRAIN_OPTIONS = {"bench_lite0": ["--init", "imagenet", "--epochs", "3", "--lr", "0.001"]}


@dataclass
class ClaimsConfig:
    """Sizes of one claims run. ``quick``: a small configuration for tests and a first look."""

    out: Path
    train: int = 3000
    val: int = 300
    classes: int = 8
    size: int = 112
    shortcut: float = 0.5
    epochs: int | None = None
    sanity_images: int = 16
    reference_images: int = 100
    seed: int = 0
    ig_steps: int = 32
    road_images: int = 100
    lite0: bool = True

    @classmethod
    def quick(cls, out: Path) -> "ClaimsConfig":
        return cls(out=out, train=800, val=80, classes=6, epochs=None, sanity_images=4, reference_images=24,
                   ig_steps=16, road_images=24)


# ------------------------------------------------------------------------------------------------------ the chain
def run(config: ClaimsConfig, say: Callable[..., None] = print) -> list[Claim]:
    """Run the whole chain (skipping steps whose outputs exist) and return the claims, also written to
    ``OUT/claims.{json,md,csv}`` and shown at the top of ``OUT/report/index.html``."""
    from jobs.common import ensure_ray

    out = config.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    clean, shortcut = out / "bench", out / "bench_shortcut"
    _make_benchmark(clean, config, shortcut=0.0, say=say)
    _make_benchmark(shortcut, config, shortcut=config.shortcut, say=say)
    checkpoints = {arch: _train(clean, arch, out / "models" / f"{arch}.pt", config, say) for arch in ARCHS}
    shortcut_model = _train(shortcut, "bench_resnet", out / "models" / "bench_resnet_shortcut.pt", config, say)
    ensure_ray()

    runs: dict[str, Path] = {}
    val, train = [str(clean / "val-*.tar")], [str(clean / "train-*.tar")]
    for arch, checkpoint in checkpoints.items():
        runs[f"maps_{arch}"] = _attribute(out / f"maps_{arch}", val, arch, checkpoint, METHODS, "top5", say=say)
        runs[f"metrics_{arch}"] = _evaluate(out / f"metrics_{arch}", runs[f"maps_{arch}"], say)
        runs[f"fmi_{arch}"] = _attribute(out / f"fmi_{arch}", train + val, arch, checkpoint, ("a_fmi",), "label",
                                         fmi=True, say=say)
        for reference in REFERENCES:
            options = {m: {key: reference} for m, key in REFERENCE_METHODS.items()}
            options["ig"]["steps"] = config.ig_steps
            runs[f"ref_{arch}_{reference}"] = _attribute(out / f"ref_{arch}_{reference}", val, arch, checkpoint,
                                                         tuple(REFERENCE_METHODS), "label", options=options,
                                                         limit=config.reference_images, say=say)
        runs[f"sanity_{arch}"] = _sanity(out / f"sanity_{arch}", val, arch, checkpoint, config.sanity_images, say)
        runs[f"road_{arch}"] = _evaluate(out / f"road_{arch}", runs[f"maps_{arch}"], say,
                                         metrics=["morf", "lerf", "road_morf", "road_lerf"],
                                         limit=config.road_images, batch_size=ROAD_BATCH)
    sc_val = [str(shortcut / "val-*.tar")]
    runs["maps_shortcut"] = _attribute(out / "maps_shortcut", sc_val, "bench_resnet", shortcut_model, METHODS,
                                       "top1", say=say)
    runs["metrics_shortcut"] = _evaluate(out / "metrics_shortcut", runs["maps_shortcut"], say,
                                         metrics=["ibd", "seconds"])
    if config.lite0:
        photos = _photo_shards(out / "photos", say)
        runs["maps_lite0"] = _attribute(out / "maps_lite0", [photos], LITE0, "imagenet", ("gbp", "tr_gbp"), "top5",
                                        say=say)
        runs["metrics_lite0"] = _evaluate(out / "metrics_lite0", runs["maps_lite0"], say,
                                          metrics=["class_discrimination", "seconds"])
        runs["sanity_lite0"] = _sanity(out / "sanity_lite0", [photos], LITE0, "imagenet", config.sanity_images,
                                      say)

    claims = evaluate_claims(runs, seed=config.seed)
    write_claims(out, claims)
    report = _report(out, runs, claims, say)
    say(f"\n{claims_markdown(claims)}\n")
    say(f"claims: {sum(c.holds is True for c in claims)} of {len(claims)} hold "
        f"({time.perf_counter() - start:.0f} s in all); report: {report}")
    return claims


# Samples per benchmark shard: the steps limited to the first N validation images (references, ROAD) take whole
# shards, so N is exact for multiples of 50 (100 by default) and rounded up to one otherwise.
SHARD_SIZE = 50


def _make_benchmark(folder: Path, config: ClaimsConfig, shortcut: float, say) -> None:
    if (folder / "classes.json").exists():
        return
    _cli(["jobs.make_benchmark", "--out", str(folder), "--size", str(config.size), "--classes", str(config.classes),
          "--train", str(config.train), "--val", str(config.val), "--shortcut", str(shortcut),
          "--seed", str(config.seed), "--samples-per-shard", str(SHARD_SIZE)], say)


def _train(shards: Path, arch: str, checkpoint: Path, config: ClaimsConfig, say) -> Path:
    if not checkpoint.exists():
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        args = ["jobs.train_benchmark_model", "--shards", str(shards), "--arch", arch, "--out", str(checkpoint),
                "--seed", str(config.seed), *TRAIN_OPTIONS.get(arch, [])]
        _cli(args + (["--epochs", str(config.epochs)] if config.epochs else []), say)
    return checkpoint


def _cli(args: list[str], say) -> None:
    say(f"$ python -m {' '.join(args)}")
    subprocess.run([sys.executable, "-m", *args], check=True)


def _attribute(out: Path, shards: list[str], model: str, weights: Path | str, methods: Sequence[str],
               targets: str, *, options: dict | None = None, fmi: bool = False, limit: int | None = None,
               say) -> Path:
    from jobs.attribute import AttributeConfig
    from jobs.attribute import run as attribute_run
    from jobs.common import expand_shards
    from workers.attribution_worker import WorkerConfig

    uris = expand_shards(shards)
    if limit is not None:
        uris = first_shards(uris, limit)
    say(f"attribute: {model} {','.join(methods)} ({targets}) -> {out}")
    attribute_run(AttributeConfig(shards=uris, out=str(out), quiet=True, worker=WorkerConfig(
        model=model, weights=str(weights), methods=list(methods), method_options=options or {}, targets=targets,
        fmi=fmi, map_dtype="float32")))
    return out


def first_shards(uris: Sequence[str], limit: int) -> list[str]:
    """The fewest leading shards (tar paths, in order) that hold at least ``limit`` samples (all of them if they
    hold fewer): the first ``limit`` images, rounded up to whole shards (SHARD_SIZE)."""
    chosen, total = [], 0
    for uri in uris:
        if total >= limit:
            break
        chosen.append(uri)
        total += _samples_in(uri)
    return chosen


def _samples_in(uri: str) -> int:
    import tarfile
    with tarfile.open(uri) as tar:
        return len({m.name.split(".")[0] for m in tar.getmembers()})


# ROAD's evaluate: a CG solve per image, order and step for every method; small actor batches keep each Ray Data block
# well inside its no-progress limit (execution_no_progress_timeout_s, 1800 s) on a loaded 2-core machine
ROAD_BATCH = 2


def _evaluate(out: Path, maps: Path, say, metrics: list[str] | None = None, limit: int | None = None,
              batch_size: int | None = None) -> Path:
    """jobs.evaluate on an attribution run (default metrics: all but ROAD); ``limit``: only its first shards
    holding at least that many samples; ``batch_size``: images per actor call (default: the job's)."""
    from jobs.evaluate import EvaluateJobConfig, attribution_run
    from jobs.evaluate import run as evaluate_run
    from workers.evaluate_worker import DEFAULT_METRICS, EvaluateConfig

    manifest = attribution_run(str(maps))
    source = manifest["config"]
    shards = None
    if limit is not None:
        shards = first_shards([entry["uri"] for _, entry in sorted(manifest["shards"].items()) if "uri" in entry],
                              limit)
    say(f"evaluate: {maps.name} -> {out}")
    evaluate_run(EvaluateJobConfig(out=str(out), quiet=True, dataset_metrics=[], shards=shards, batch_size=batch_size,
                                   worker=EvaluateConfig(attributions=str(maps), model=source["model"],
                                                         weights=source["weights"],
                                                         metrics=list(metrics or DEFAULT_METRICS))))
    return out


def _sanity(out: Path, shards: list[str], model: str, weights: Path | str, images: int, say) -> Path:
    from jobs.sanity import SanityJobConfig
    from jobs.sanity import run as sanity_run
    from workers.sanity_worker import SanityConfig

    if not (out / "manifest.json").exists():
        say(f"sanity: {model} gbp,tr_gbp on {images} images -> {out}")
        sanity_run(SanityJobConfig(shards=shards, out=str(out), max_images=images, grid_images=2, quiet=True,
                                   overwrite=True, worker=SanityConfig(model=model, weights=str(weights),
                                                                       methods=["gbp", "tr_gbp"])))
    return out


def _photo_shards(folder: Path, say) -> str:
    from attribution.data.sample_sets import photo_samples
    from attribution.data.shards import write_shards

    if not list(folder.glob("*.tar")):
        write_shards(photo_samples(), folder, "photos", 4, log=lambda *_: None)
    return str(folder / "photos-*.tar")


def _report(out: Path, runs: dict[str, Path], claims: Sequence[Claim], say) -> Path:
    from jobs.report import ReportConfig, build

    wanted = [p for name, p in runs.items() if name.startswith(("metrics_", "sanity_", "road_"))]
    return build(ReportConfig(runs=[str(p) for p in wanted], out=str(out / "report"), grid_images=6, quiet=True,
                              title="The papers' claims on the procedural benchmark and EfficientNet-Lite0",
                              claims=pd.DataFrame([c.as_row() for c in claims])))


def parse_args(argv: Sequence[str] | None = None) -> ClaimsConfig:
    """CLI -> ClaimsConfig."""
    p = argparse.ArgumentParser(prog="python -m jobs.claims", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/claims"))
    p.add_argument("--quick", action="store_true", help="small sizes (a first look, and the tests)")
    p.add_argument("--train", type=int, default=None)
    p.add_argument("--val", type=int, default=None)
    p.add_argument("--road-images", type=int, default=None,
                   help="validation images for MoRF/LeRF with black pixels and with ROAD (default 100; quick 24)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-lite0", action="store_true", help="skip the real EfficientNet-Lite0 part")
    a = p.parse_args(argv)
    config = ClaimsConfig.quick(a.out) if a.quick else ClaimsConfig(out=a.out)
    config.seed, config.lite0 = a.seed, not a.no_lite0
    for name in ("train", "val", "road_images"):
        if getattr(a, name) is not None:
            if getattr(a, name) < 10:
                from jobs.common import fail
                fail(f"--{name.replace('_', '-')} must be at least 10")
            setattr(config, name, getattr(a, name))
    return config


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    from attribution.errors import AttributionError
    from jobs.common import JobError, fail

    config = parse_args(argv)
    try:
        run(config)
    except (JobError, AttributionError, subprocess.CalledProcessError) as exc:
        fail(str(exc).splitlines()[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
