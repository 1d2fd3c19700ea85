"""python -m jobs.claims: the papers' claims put to the test on the procedural benchmark and on the real Lite0.

    python -m jobs.claims --out runs/claims [--quick] [--val 300] [--train 3000] [--seed 0]

A documented chain of the existing jobs; every intermediate output stays under ``--out`` so each step can be
rerun or inspected on its own (reruns skip what is already there):

1. ``jobs.make_benchmark``: the benchmark (``bench/``) and its border-shortcut variant (``bench_shortcut/``);
2. ``jobs.train_benchmark_model``: ``bench_resnet``, ``bench_vgg`` and ``bench_vgg_plain`` on the benchmark,
   ``bench_resnet`` on the shortcut variant (``models/*.pt``);
3. ``jobs.attribute`` → ``jobs.evaluate`` on the validation split for each model (saliency, gbp, gradcam,
   tr_gbp, a_fmi, top-5 maps), on the shortcut variant (top-1 maps, for IBD), with ``--targets label --fmi`` on
   train + val (FMI prototypes), and a_fmi/ig/deeplift with black, white and random references; MoRF/LeRF
   with black pixels and with ROAD's noisy linear imputation on the first ``road_images`` validation images;
4. ``jobs.sanity`` (gbp, tr_gbp) for each model; the same on the real EfficientNet-Lite0 with the real photos;
5. ``jobs.report`` over everything, with the claims table on top.

Each claim is a comparison of measured numbers in the direction the paper states; the table prints both sides
and whether it holds. A claim that does not hold is a finding: the benchmark is never tuned to make one hold.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

METHODS = ("saliency", "gbp", "gradcam", "tr_gbp", "a_fmi")
REFERENCES = ("black", "white", "random")
REFERENCE_METHODS = {"a_fmi": "reference", "ig": "baseline", "deeplift": "baseline"}
ARCHS = ("bench_resnet", "bench_vgg", "bench_vgg_plain")  # bench_vgg_plain: conv biases, no BatchNorm (issue 16)
LITE0 = "efficientnet_lite0"


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


@dataclass
class Claim:
    """One claim of a paper, the numbers measured for it and whether they are in the stated direction."""

    paper: str
    claim: str
    setting: str
    measured: str
    holds: bool | None

    def as_row(self) -> dict:
        verdict = "n/a" if self.holds is None else ("holds" if self.holds else "does not hold")
        return {"paper": self.paper, "claim": self.claim, "setting": self.setting, "measured": self.measured,
                "verdict": verdict}


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
                                         limit=config.road_images)
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

    claims = evaluate_claims(runs, config)
    _write_claims(out, claims)
    report = _report(out, runs, claims, say)
    say(f"\n{claims_markdown(claims)}\n")
    say(f"claims: {sum(c.holds is True for c in claims)} of {len(claims)} hold "
        f"({time.perf_counter() - start:.0f} s in all); report: {report}")
    return claims


def _make_benchmark(folder: Path, config: ClaimsConfig, shortcut: float, say) -> None:
    if (folder / "classes.json").exists():
        return
    _cli(["jobs.make_benchmark", "--out", str(folder), "--size", str(config.size), "--classes", str(config.classes),
          "--train", str(config.train), "--val", str(config.val), "--shortcut", str(shortcut),
          "--seed", str(config.seed)], say)


def _train(shards: Path, arch: str, checkpoint: Path, config: ClaimsConfig, say) -> Path:
    if not checkpoint.exists():
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        args = ["jobs.train_benchmark_model", "--shards", str(shards), "--arch", arch, "--out", str(checkpoint),
                "--seed", str(config.seed)]
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
    if limit is not None:  # the first shards holding at least ``limit`` samples
        uris = uris[:max(1, -(-limit // _samples_per_shard(uris[0])))]
    say(f"attribute: {model} {','.join(methods)} ({targets}) -> {out}")
    attribute_run(AttributeConfig(shards=uris, out=str(out), quiet=True, worker=WorkerConfig(
        model=model, weights=str(weights), methods=list(methods), method_options=options or {}, targets=targets,
        fmi=fmi, map_dtype="float32")))
    return out


def _samples_per_shard(uri: str) -> int:
    import tarfile
    with tarfile.open(uri) as tar:
        return max(1, len({m.name.split(".")[0] for m in tar.getmembers()}))


def _evaluate(out: Path, maps: Path, say, metrics: list[str] | None = None, limit: int | None = None) -> Path:
    """jobs.evaluate on an attribution run (default metrics: all but ROAD); ``limit``: only its first shards
    holding at least that many samples."""
    from jobs.evaluate import EvaluateJobConfig, attribution_run
    from jobs.evaluate import run as evaluate_run
    from workers.evaluate_worker import DEFAULT_METRICS, EvaluateConfig

    manifest = attribution_run(str(maps))
    source = manifest["config"]
    shards = None
    if limit is not None:
        uris = [entry["uri"] for _, entry in sorted(manifest["shards"].items()) if "uri" in entry]
        shards = uris[:max(1, -(-limit // _samples_per_shard(uris[0])))]
    say(f"evaluate: {maps.name} -> {out}")
    evaluate_run(EvaluateJobConfig(out=str(out), quiet=True, dataset_metrics=[], shards=shards,
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


# ------------------------------------------------------------------------------------------------------ the claims
def evaluate_claims(runs: dict[str, Path], config: ClaimsConfig) -> list[Claim]:
    """Every claim of the two papers that the runs can test, from their metric, sanity and map tables."""
    from attribution.metrics.protocols import ebpg_protocol, ibd_auc_protocol

    claims: list[Claim] = []
    for arch in ARCHS:
        m = _metrics(runs[f"metrics_{arch}"])
        cd = _mean(m, "class_discrimination")
        claims.append(_less("TR-GBP", "TR-GBP is class-sensitive where GBP is not (class discrimination: mean "
                            "rank correlation of the top-5 class maps, lower = more class-sensitive)", arch,
                            "tr_gbp", cd.get("tr_gbp"), "gbp", cd.get("gbp")))
        final = _sanity_change(runs[f"sanity_{arch}"])
        claims.append(_less("TR-GBP", "TR-GBP changes under cascading randomisation where GBP barely does "
                            "(Spearman |map| to the original, mean over all cascading steps)", arch,
                            "tr_gbp", final.get("tr_gbp"), "gbp", final.get("gbp")))
        eligible = m[(m.metric == "ebpg") & (m.n_boxes == 1) & (m.box_share < 0.5)].sort_values(["shard", "key"])
        ebpg = {method: ebpg_protocol(g.value.to_numpy(dtype=float), sample=500, repeats=5, seed=config.seed)[0]
                for method, g in eligible.groupby("method")}
        tr, gbp = ebpg.get("tr_gbp"), ebpg.get("gbp")
        others = {k: ebpg.get(k) for k in ("saliency", "gradcam")}
        holds = None if tr is None or gbp is None or None in others.values() else \
            bool(tr >= 0.9 * gbp and all(tr > v for v in others.values()))
        claims.append(Claim("TR-GBP", "EBPG of TR-GBP is competitive with GBP (≥ 0.9×) and above Saliency and "
                            "Grad-CAM (Table 1)", arch, _fmt(ebpg, ("tr_gbp", "gbp", "saliency", "gradcam")),
                            holds))
        ins = _mean(m, "insertion_accuracy")
        claims.append(_less("A-FMI", "A-FMI ≥ Grad-CAM on insertion Accuracy-AUC (Table 1)", arch,
                            "gradcam", ins.get("gradcam"), "a_fmi", ins.get("a_fmi"), or_equal=True))
        claims.append(_reference_claim(runs, arch))
        if f"road_{arch}" in runs:
            claims += _road_claims(runs[f"road_{arch}"], arch)
        claims.append(_fmi_claim(runs[f"fmi_{arch}"], arch))
    gaps = {arch: _mean(_metrics(runs[f"metrics_{arch}"]), "insertion_accuracy") for arch in ARCHS}
    gap = {arch: (g.get("a_fmi", np.nan) - g.get("gradcam", np.nan)) for arch, g in gaps.items()}
    claims.append(_less("A-FMI", "A-FMI's insertion advantage over Grad-CAM is largest on the VGG-style head "
                        "(where the secant rule matters)", "both", "resnet gap", gap["bench_resnet"],
                        "vgg gap", gap["bench_vgg"]))
    s = _metrics(runs["metrics_shortcut"])
    ibd = s[(s.metric == "ibd") & s.correct.notna()]
    auc = {method: ibd_auc_protocol(g.value.to_numpy(dtype=float), ~g.correct.to_numpy(dtype=bool))
           for method, g in ibd.groupby("method")}
    wrong = int((~ibd.drop_duplicates("key").correct.astype(bool)).sum())
    best = max((v, k) for k, v in auc.items() if np.isfinite(v))[1] if any(np.isfinite(list(auc.values()))) else None
    claims.append(Claim("TR-GBP", "IBD of TR-GBP separates wrong from right predictions best (IBD-AUC, Table 2)",
                        f"bench_resnet on the border-shortcut variant ({wrong} wrong of "
                        f"{ibd.key.nunique()})", _fmt(auc, sorted(auc)), None if best is None else best == "tr_gbp"))
    if "metrics_lite0" in runs:
        cd = _mean(_metrics(runs["metrics_lite0"]), "class_discrimination")
        claims.append(_less("TR-GBP", "class-discriminative top-5 maps on a real ImageNet model", "efficientnet_lite0,"
                            " real photos", "tr_gbp", cd.get("tr_gbp"), "gbp", cd.get("gbp")))
        final = _sanity_change(runs["sanity_lite0"])
        claims.append(_less("TR-GBP", "cascading randomisation changes TR-GBP, barely GBP, on a real ImageNet "
                            "model", "efficientnet_lite0, real photos", "tr_gbp", final.get("tr_gbp"), "gbp",
                            final.get("gbp")))
    return claims


def _reference_claim(runs: dict[str, Path], arch: str) -> Claim:
    """A-FMI §4.2: mean over images and over the 3 pairs of references of the Spearman correlation of the maps."""
    from attribution.metrics.discrimination import class_discrimination
    from workers.sink import maps_of, read_table

    import torch

    tables = {r: read_table(str(runs[f"ref_{arch}_{r}"])) for r in REFERENCES}
    agreement = {}
    for method in REFERENCE_METHODS:
        per_ref = []
        for reference in REFERENCES:
            table = tables[reference]
            rows = table.filter(np.asarray(table.column("method").to_pylist()) == method).sort_by("key")
            per_ref.append((rows.column("key").to_pylist(), maps_of(rows)))
        keys = set(per_ref[0][0]).intersection(*[set(k) for k, _ in per_ref[1:]])
        stacked = np.stack([m[[k.index(x) for x in sorted(keys)]] for k, m in per_ref], axis=1)  # [N, R, H, W]
        agreement[method] = float(torch.nanmean(class_discrimination(torch.from_numpy(stacked))))
    others = [agreement["ig"], agreement["deeplift"]]
    return Claim("A-FMI", "A-FMI is insensitive to the reference (black/white/random) while IG and DeepLIFT are "
                 "not (mean Spearman between maps of different references, §4.2)", arch,
                 _fmt(agreement, tuple(REFERENCE_METHODS)), bool(all(agreement["a_fmi"] > o for o in others)))


def _road_claims(run: Path, arch: str) -> list[Claim]:
    """TR-GBP Fig. 6 (MoRF: TR-GBP beats Grad-CAM; LeRF: TR-GBP best, on ResNet) with black pixels and with ROAD
    (Rong et al. 2022) on the same images; the ROAD rows add the Kendall τ between the methods' black-pixel and
    ROAD rankings (1 = the same order)."""
    m = _metrics(run)
    images = m.key.nunique()
    out = []
    for order in ("morf", "lerf"):
        black, road = _mean(m, order), _mean(m, f"road_{order}")
        tau = _kendall(black, road)
        for name, values in (("black pixels", black), ("ROAD", road)):
            setting = f"{arch}, {name}, {images} images"
            extra = f"; ranking vs black τ = {_num(tau)}" if name == "ROAD" else ""
            if order == "morf":
                claim = _less("TR-GBP", f"TR-GBP outperforms Grad-CAM on MoRF (Fig. 6; AUC of the target "
                              f"probability, lower is better), {name}", setting, "tr_gbp", values.get("tr_gbp"),
                              "gradcam", values.get("gradcam"))
            else:
                tr = values.get("tr_gbp")
                rest = [v for k, v in values.items() if k != "tr_gbp"]
                holds = None if tr is None or not rest else bool(all(tr > v for v in rest))
                claim = Claim("TR-GBP", f"TR-GBP is best on LeRF (Fig. 6, ResNet; AUC, higher is better), {name}",
                              setting, _fmt(values, sorted(values)), holds)
            claim.measured += extra
            out.append(claim)
    return out


def _kendall(a: dict[str, float], b: dict[str, float]) -> float:
    """Kendall's τ-a between two scorings of the same methods (NaN with fewer than two in common)."""
    keys = sorted(k for k in a if k in b and np.isfinite(a[k]) and np.isfinite(b[k]))
    pairs = [(i, j) for i in range(len(keys)) for j in range(i + 1, len(keys))]
    if not pairs:
        return float("nan")
    sign = [np.sign(a[keys[i]] - a[keys[j]]) * np.sign(b[keys[i]] - b[keys[j]]) for i, j in pairs]
    return float(np.mean(sign))


def _fmi_claim(run: Path, arch: str) -> Claim:
    from jobs.evaluate import dataset_metrics

    table = dataset_metrics(str(run)).to_pylist()
    if not table:
        return Claim("A-FMI", "FMI prototype classification accuracy (§4.1; paper 86.9 % MNIST, 88.4 % ImageNet)",
                     arch, "no FMI vectors", None)
    row = table[0]
    return Claim("A-FMI", "FMI prototype classification accuracy is high (§4.1; paper 86.9 % MNIST, 88.4 % "
                 "ImageNet; here: ≥ 85 %)", arch, f"{100 * row['value']:.1f} % on {row['n']} images "
                 f"({json.loads(row['detail'])['split']})", bool(row["value"] >= 0.85))


def _metrics(run: Path) -> pd.DataFrame:
    from workers.sink import read_table
    return read_table(str(run), "metrics").drop_columns(["steps", "curve"]).to_pandas()


def _mean(frame: pd.DataFrame, metric: str) -> dict[str, float]:
    return frame[frame.metric == metric].groupby("method").value.mean().to_dict()


def _sanity_change(run: Path) -> dict[str, float]:
    """Mean over the randomisation steps (all of them, top block down to the first) and over images of the
    Spearman correlation of |map| with the original |map| (NaN where a map went constant is skipped)."""
    frame = pd.read_parquet(run / "sanity")
    steps = frame[frame.step > 0]
    return steps.groupby("method").spearman_abs.apply(lambda v: float(np.nanmean(v)) if v.notna().any()
                                                      else np.nan).to_dict()


def _less(paper: str, claim: str, setting: str, low_name: str, low: float | None, high_name: str,
          high: float | None, or_equal: bool = False) -> Claim:
    measured = f"{low_name} {_num(low)} vs {high_name} {_num(high)}"
    if low is None or high is None or not (np.isfinite(low) and np.isfinite(high)):
        return Claim(paper, claim, setting, measured, None)
    return Claim(paper, claim, setting, measured, bool(low <= high if or_equal else low < high))


def _fmt(values: dict[str, float], order: Sequence[str]) -> str:
    return ", ".join(f"{k} {_num(values.get(k))}" for k in order)


def _num(value: float | None) -> str:
    return "—" if value is None or not np.isfinite(value) else f"{value:.3f}"


def claims_markdown(claims: Sequence[Claim]) -> str:
    """The claims as a Markdown table."""
    rows = [c.as_row() for c in claims]
    lines = ["| paper | claim | setting | measured | verdict |", "|---|---|---|---|---|"]
    lines += [f"| {r['paper']} | {r['claim']} | {r['setting']} | {r['measured']} | **{r['verdict']}** |"
              for r in rows]
    return "\n".join(lines)


def _write_claims(out: Path, claims: Sequence[Claim]) -> None:
    rows = [c.as_row() for c in claims]
    (out / "claims.json").write_text(json.dumps(rows, indent=2))
    pd.DataFrame(rows).to_csv(out / "claims.csv", index=False)
    (out / "claims.md").write_text(claims_markdown(claims) + "\n")


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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-lite0", action="store_true", help="skip the real EfficientNet-Lite0 part")
    a = p.parse_args(argv)
    config = ClaimsConfig.quick(a.out) if a.quick else ClaimsConfig(out=a.out)
    config.seed, config.lite0 = a.seed, not a.no_lite0
    for name in ("train", "val"):
        if getattr(a, name) is not None:
            if getattr(a, name) < 10:
                from jobs.common import fail
                fail(f"--{name} must be at least 10")
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
