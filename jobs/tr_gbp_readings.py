"""python -m jobs.tr_gbp_readings: which reading of TR-GBP's §4.1 reproduces the paper — measured side by side.

    python -m jobs.tr_gbp_readings --claims runs/claims --out runs/tr_gbp_readings [--images 300]
                                   [--sanity-images 8] [--lite0-sanity-images 3] [--no-lite0] [--batch-size 32]
    python -m jobs.tr_gbp_readings --bench DIR --shortcut-bench DIR --model bench_resnet=PATH … \\
                                   --shortcut-model CHECKPOINT --out DIR

Every combination of the three ``tr_gbp`` options (``bias_terms`` effective | parameter | none × ``layer_norm``
none | max × ``input_term`` gradient | gradient_x_input: 12 readings), and GBP as the yardstick, on each benchmark
model (its clean validation split) and on the real EfficientNet-Lite0 with the sample photos:

* ``ebpg``: EBPG of the top-1 map (negatives clamped, as jobs.evaluate), mean over the eligible images (one box
  < 50 % of the image; the photos: every photo with boxes, as in the issue's measurement); ``empty``: how many of
  those maps have no positive pixel (no EBPG, left out; attribution.metrics.localisation); ``ebpg_chance``: the
  EBPG of a constant map, i.e. the boxes' mean share of the image — the level a map that knows nothing scores
  (0.48 on the 7 photos, whose boxes are large, 0.18 on the benchmark);
* ``class_discrimination``: mean pairwise Spearman correlation of the top-5 class maps (lower = more
  class-sensitive);
* ``sanity_spearman_abs``: cascading randomisation (attribution.sanity, seed 0), Spearman of |map| to the
  original map, mean over all steps and the first ``--sanity-images`` images (lower = more sensitive);
* ``ibd_auc`` (the model trained on the border-shortcut variant only, the architecture its checkpoint names;
  ``bench_resnet`` in a jobs.claims directory): IBD-AUC of the top-1 maps for "prediction wrong" (TR-GBP §5.4
  protocol).

Also measured, to explain the benchmark/Lite0 difference: per bias unit the effective bias (BatchNorm folded) and
the own bias parameters (sign share, mean, mean |b|: ``bias_stats.csv``), and per resolution the share of the
TR-GBP map's L2 norm and its contrast on the object (``resolution_shares.csv``). Outputs: ``readings.{csv,md}``,
``bias_stats.csv``, ``resolution_shares.csv``, ``grid_<model>.png`` (Fig.-4 style: images × readings), and
``summary.json`` (configuration, seconds).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from attribution import models
from attribution.hooks import bias_units
from attribution.images import decode_sample
from attribution.maps import upsample
from attribution.methods import attribute_with_extras
from attribution.methods.tr_gbp import BIAS_TERMS, INPUT_TERMS, LAYER_NORMS
from attribution.metrics.discrimination import class_discrimination
from attribution.metrics.localisation import (border_intensity, box_mask, ebpg_eligible, energy_pointing_game,
                                              has_energy)
from attribution.metrics.protocols import ibd_auc_protocol
from attribution.sanity import cascading_maps, similarity_to_original
from workers.shards import read_shard

READINGS: list[dict[str, str]] = [{"bias_terms": b, "layer_norm": n, "input_term": i}
                                  for b in BIAS_TERMS for n in LAYER_NORMS for i in INPUT_TERMS]
DEFAULT_READING = {"bias_terms": "effective", "layer_norm": "none", "input_term": "gradient"}
BENCH_ARCHS = models.BENCH_MODELS  # bench_resnet, bench_vgg, bench_vgg_plain, bench_lite0


def reading_label(reading: dict[str, str] | None) -> str:
    """'gbp' for None, else 'bias/layer_norm/input', e.g. 'effective/none/gradient'."""
    if reading is None:
        return "gbp"
    return f"{reading['bias_terms']}/{reading['layer_norm']}/{reading['input_term']}"


@dataclass
class Split:
    """Decoded samples: ``images`` normalised float32 [N, 3, S, S], ``labels`` int64 [N], ``masks`` bool
    [N, S, S] (union of the boxes at input resolution), ``eligible`` bool [N] (EBPG protocol filter), ``pixels``
    uint8 [N, S, S, 3] for the grids, ``keys``."""

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    eligible: torch.Tensor
    pixels: np.ndarray
    keys: list[str] = field(default_factory=list)


def load_split(paths: Sequence[str], preprocessing: models.Preprocessing, limit: int | None = None, *,
               area_filter: bool = True) -> Split:
    """The first ``limit`` samples of the shards, decoded as jobs.attribute decodes them. ``area_filter=False``:
    every image with at least one box is EBPG-eligible (the photos)."""
    images, labels, masks, eligible, pixels, keys = [], [], [], [], [], []
    for path in paths:
        for row in read_shard(path):
            if row["error"] or (limit is not None and len(keys) >= limit):
                continue
            s = decode_sample(row["jpg"], row["cls"], row["json"], preprocessing)
            x = torch.from_numpy(s.pixels).float() / 255.0
            size = x.shape[-1]
            images.append(preprocessing.normalise(x))
            labels.append(s.label)
            masks.append(box_mask(s.bboxes_input, size, size))
            ok = ebpg_eligible(s.bboxes, s.width, s.height) if area_filter else bool(s.bboxes)
            eligible.append(ok)
            pixels.append(s.pixels.transpose(1, 2, 0))
            keys.append(row["key"])
    return Split(torch.stack(images), torch.tensor(labels), torch.stack(masks), torch.tensor(eligible),
                 np.stack(pixels), keys)


def maps_for(spec: models.ModelSpec, images: torch.Tensor, targets: torch.Tensor, reading: dict | None, *,
             batch_size: int = 32, return_layers: bool = False) -> tuple[torch.Tensor, dict]:
    """Maps [N, T, H, W] of ``reading`` (None: GBP) for targets [N, T], in batches; with ``return_layers`` also
    TR-GBP's per-layer maps {name: [N, T, h, w]}."""
    method = "gbp" if reading is None else "tr_gbp"
    options = {} if reading is None else dict(reading, return_layers=return_layers)
    out, layers = [], {}
    for i in range(0, len(images), batch_size):
        result = attribute_with_extras(method, spec, images[i:i + batch_size], targets[i:i + batch_size], **options)
        out.append(result.maps)
        for name, m in result.extras.get("layers", {}).items():
            layers.setdefault(name, []).append(m)
    return torch.cat(out), {n: torch.cat(m) for n, m in layers.items()}


def top_classes(spec: models.ModelSpec, images: torch.Tensor, k: int = 5, batch_size: int = 64) -> torch.Tensor:
    """The model's top-k classes [N, min(k, classes)], best first."""
    with torch.no_grad():
        return torch.cat([(lambda logits: logits.topk(min(k, logits.shape[1]), dim=1).indices)(
                          spec.module(images[i:i + batch_size]))
                          for i in range(0, len(images), batch_size)])


def measure_model(name: str, spec: models.ModelSpec, split: Split, *, sanity_images: int, batch_size: int,
                  readings: Sequence[dict] = READINGS,
                  say: Callable[[str], None] = print) -> tuple[list[dict], dict[str, list[np.ndarray]]]:
    """One row per reading (and GBP) with ebpg, empty, class_discrimination, sanity_spearman_abs; and the top-1
    maps of the first 3 images per reading for the grid."""
    top5 = top_classes(spec, split.images)
    rows, grid = [], {}
    chance = float(energy_pointing_game(torch.ones_like(split.masks[split.eligible], dtype=torch.float32),
                                        split.masks[split.eligible]).mean())
    for reading in [None, *readings]:
        t0 = time.perf_counter()
        maps5, _ = maps_for(spec, split.images, top5, reading, batch_size=batch_size)
        top1 = maps5[:, 0]
        sel = split.eligible
        ebpg = energy_pointing_game(top1[sel], split.masks[sel])
        method, options = ("gbp", {}) if reading is None else ("tr_gbp", dict(reading))
        _, cascade = cascading_maps(spec, split.images[:sanity_images], top5[:sanity_images, 0], [method],
                                    options={method: options}, seed=0)
        sanity = similarity_to_original(cascade)["spearman_abs"][1:]
        rows.append({"model": name, "reading": reading_label(reading), **(reading or {}),
                     "ebpg": float(torch.nanmean(ebpg)), "ebpg_images": int(sel.sum()), "ebpg_chance": chance,
                     "empty": int((~has_energy(top1[sel])).sum()),
                     "class_discrimination": float(torch.nanmean(class_discrimination(maps5))),
                     "sanity_spearman_abs": float(torch.nanmean(sanity)), "seconds": time.perf_counter() - t0})
        grid[reading_label(reading)] = [m.numpy() for m in top1[:3]]
        say(f"  {name} {reading_label(reading):40s} EBPG {rows[-1]['ebpg']:.3f} (empty {rows[-1]['empty']})  "
            f"CD {rows[-1]['class_discrimination']:.3f}  sanity {rows[-1]['sanity_spearman_abs']:.3f}")
    return rows, grid


def measure_ibd(spec: models.ModelSpec, split: Split, *, batch_size: int, border: int = 16,
                readings: Sequence[dict] = READINGS) -> list[dict]:
    """IBD-AUC of the top-1 maps for "prediction wrong", per reading (and GBP); ``border`` in map pixels."""
    top5 = top_classes(spec, split.images)
    wrong = (top5[:, 0] != split.labels).numpy()
    rows = []
    for reading in [None, *readings]:
        maps, _ = maps_for(spec, split.images, top5[:, :1], reading, batch_size=batch_size)
        ibd = border_intensity(maps[:, 0], border=border).numpy()
        rows.append({"reading": reading_label(reading), "ibd_auc": ibd_auc_protocol(ibd, wrong),
                     "ibd_empty": int(np.isnan(ibd).sum()), "ibd_wrong": int(wrong.sum()), "ibd_images": len(wrong)})
    return rows


def bias_statistics(name: str, spec: models.ModelSpec, images: torch.Tensor) -> list[dict]:
    """Per bias unit (both readings): resolution (the unit's input size), channels, share of negative biases,
    mean and mean |b|; for the effective reading also the mean pre-activation shift relative to the unit's mean
    |output| (how much the bias moves the units)."""
    rows = []
    for fold in (True, False):
        with bias_units(spec.module, lambda *_: None, fold_batchnorm=fold) as units, torch.no_grad():
            spec.module(images)
        for u in units:
            b = u.bias.double()
            rows.append({"model": name, "reading": "effective" if fold else "parameter", "unit": u.name,
                         "resolution": "x".join(map(str, u.input_size)) if u.input_size else "linear",
                         "channels": b.numel(), "negative_share": float((b < 0).double().mean()),
                         "mean": float(b.mean()), "mean_abs": float(b.abs().mean()),
                         "mean_abs_output": float(u.output.detach().abs().mean())})
    return rows


def resolution_shares(name: str, spec: models.ModelSpec, split: Split, *, batch_size: int,
                      images: int = 64) -> list[dict]:
    """For the default reading: per resolution (R_0 'input', each bias resolution, 'linear'), the mean over images
    of its share of Σ_r ||T_r||₂ (T_r: that resolution's upsampled top-1 term) and its contrast on the object,
    (mean inside the box − mean outside) / mean |T_r|, with and without the top-5 removal."""
    x, masks = split.images[:images], split.masks[:images]
    top5 = top_classes(spec, x)
    rows = []
    for removed in (True, False):
        reading = dict(DEFAULT_READING, remove_shared=removed)
        _, layers = maps_for(spec, x, top5, reading, batch_size=batch_size, return_layers=True)
        terms: dict[str, torch.Tensor] = {}
        for layer, m in layers.items():
            key = "input" if layer == "input" else ("linear" if m.shape[-1] == 1 else "x".join(map(str, m.shape[-2:])))
            t = upsample(m[:, 0], tuple(x.shape[-2:]))
            terms[key] = terms[key] + t if key in terms else t
        norms = {k: t.flatten(1).norm(dim=1) for k, t in terms.items()}
        total = sum(norms.values())
        for key, t in terms.items():
            inside = (t * masks).sum((1, 2)) / masks.sum((1, 2)).clamp(min=1)
            outside = (t * ~masks).sum((1, 2)) / (~masks).sum((1, 2)).clamp(min=1)
            contrast = (inside - outside) / t.abs().mean((1, 2)).clamp(min=1e-30)
            rows.append({"model": name, "removal": removed, "resolution": key,
                         "l2_share": float((norms[key] / total).mean()),
                         "object_contrast": float(contrast.mean())})
    return rows


def draw_grid(name: str, grid: dict[str, list[np.ndarray]], pixels: np.ndarray, out: Path) -> Path:
    """Fig.-4-style grid: rows = images (photo first), columns = GBP and the readings."""
    from jobs.figures import heatmap_grid

    labels = list(grid)
    cells = [[grid[label][r] for label in labels] for r in range(len(pixels))]
    return heatmap_grid(cells, out=out, row_labels=[f"image {r + 1}" for r in range(len(pixels))],
                        col_labels=[label.replace("/", "\n") for label in labels], images=list(pixels),
                        signed=True, title=f"{name}: top-1 maps, GBP and the 12 TR-GBP readings "
                                           "(bias_terms / layer_norm / input_term)")


@dataclass
class StudyConfig:
    """What to measure: benchmark models {arch: checkpoint} on ``bench`` (clean val), the shortcut model on
    ``shortcut_bench`` (val), Lite0 on the sample photos; sizes."""

    out: Path
    bench: Path | None = None
    checkpoints: dict[str, Path] = field(default_factory=dict)
    shortcut_bench: Path | None = None
    shortcut_checkpoint: Path | None = None
    lite0: bool = True
    images: int = 300
    sanity_images: int = 8
    lite0_sanity_images: int = 3
    batch_size: int = 32
    readings: list[dict] = field(default_factory=lambda: list(READINGS))

    @classmethod
    def from_claims(cls, claims: Path, out: Path, **sizes) -> "StudyConfig":
        """The benchmark, models and shortcut model of a ``jobs.claims`` output directory (those present)."""
        checkpoints = {a: claims / "models" / f"{a}.pt" for a in BENCH_ARCHS if (claims / "models" / f"{a}.pt").exists()}
        shortcut = claims / "models" / "bench_resnet_shortcut.pt"
        return cls(out=out, bench=claims / "bench", checkpoints=checkpoints, shortcut_bench=claims / "bench_shortcut",
                   shortcut_checkpoint=shortcut if shortcut.exists() else None, **sizes)


def run(config: StudyConfig, say: Callable[[str], None] = print) -> pd.DataFrame:
    """Measure everything (module docstring), write the outputs under ``config.out`` and return the readings
    table (one row per model × reading)."""
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows, biases, shares = [], [], []
    subjects: list[tuple[str, models.ModelSpec, Split]] = []
    for arch, checkpoint in config.checkpoints.items():
        spec = models.load(arch, weights=str(checkpoint))
        split = load_split(sorted(str(p) for p in config.bench.glob("val-*.tar")), spec.preprocessing, config.images)
        subjects.append((arch, spec, split))
    if config.lite0:
        spec = models.load("efficientnet_lite0", weights="imagenet")
        subjects.append(("efficientnet_lite0", spec, load_split([_photo_shard(out)], spec.preprocessing,
                                                                 area_filter=False)))
    for name, spec, split in subjects:
        say(f"{name}: {len(split.keys)} images, {int(split.eligible.sum())} EBPG-eligible")
        sanity = config.lite0_sanity_images if name == "efficientnet_lite0" else config.sanity_images
        model_rows, grid = measure_model(name, spec, split, sanity_images=sanity, batch_size=config.batch_size,
                                         readings=config.readings, say=say)
        rows += model_rows
        biases += bias_statistics(name, spec, split.images[:32])
        shares += resolution_shares(name, spec, split, batch_size=config.batch_size)
        draw_grid(name, grid, split.pixels[:3], out / f"grid_{name}.png")
    table = pd.DataFrame(rows)
    if config.shortcut_checkpoint is not None:
        spec = models.load(str(config.shortcut_checkpoint))     # the architecture the checkpoint names
        split = load_split(sorted(str(p) for p in config.shortcut_bench.glob("val-*.tar")), spec.preprocessing,
                           config.images)
        ibd = pd.DataFrame(measure_ibd(spec, split, batch_size=config.batch_size, readings=config.readings))
        say(f"shortcut {spec.name}: {int(ibd.ibd_wrong.iloc[0])} wrong of {len(split.keys)}")
        table = table.merge(ibd.assign(model=spec.name), on=["model", "reading"], how="left")
    table.to_csv(out / "readings.csv", index=False)
    (out / "readings.md").write_text(readings_markdown(table), encoding="utf-8")
    pd.DataFrame(biases).to_csv(out / "bias_stats.csv", index=False)
    pd.DataFrame(shares).to_csv(out / "resolution_shares.csv", index=False)
    summary = {"images": config.images, "sanity_images": config.sanity_images,
               "lite0_sanity_images": config.lite0_sanity_images, "models": [s[0] for s in subjects],
               "checkpoints": {k: str(v) for k, v in config.checkpoints.items()},
               "shortcut_checkpoint": str(config.shortcut_checkpoint), "seconds": time.perf_counter() - start}
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    say(f"wrote {out} in {summary['seconds']:.0f} s")
    return table


def readings_markdown(table: pd.DataFrame) -> str:
    """Rows = readings, columns = model × metric (EBPG with its empty-map count, class discrimination,
    cascading-randomisation Spearman |map|, and IBD-AUC where measured)."""
    lines = []
    for model, group in table.groupby("model", sort=False):
        head = ["reading", "EBPG ↑ (empty maps)", "class discr. ↓", "sanity Spearman |map| ↓"]
        has_ibd = "ibd_auc" in group and group["ibd_auc"].notna().any()
        head += ["IBD-AUC (shortcut) ↑"] if has_ibd else []
        lines += [f"#### {model}", "", f"EBPG of a constant map (chance): {group.ebpg_chance.iloc[0]:.3f}", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in group.itertuples(index=False):
            cells = [r.reading, f"{r.ebpg:.3f} ({r.empty} of {r.ebpg_images})", f"{r.class_discrimination:.3f}",
                     f"{r.sanity_spearman_abs:.3f}"]
            cells += [f"{r.ibd_auc:.3f}"] if has_ibd else []
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _photo_shard(out: Path) -> str:
    from attribution.data.sample_sets import photo_samples
    from attribution.data.shards import write_shards

    folder = out / "photos"
    if not list(folder.glob("*.tar")):
        write_shards(photo_samples(), folder, "photos", 100, log=lambda *_: None)
    return str(sorted(folder.glob("*.tar"))[0])


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (module docstring)."""
    p = argparse.ArgumentParser(prog="python -m jobs.tr_gbp_readings", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--claims", help="a jobs.claims output directory: its bench/, bench_shortcut/ and models/")
    p.add_argument("--bench", help="a jobs.make_benchmark directory (clean)")
    p.add_argument("--model", action="append", default=[], help="ARCH=CHECKPOINT, repeatable")
    p.add_argument("--shortcut-bench", help="the border-shortcut variant's directory")
    p.add_argument("--shortcut-model", help="a benchmark checkpoint trained on the shortcut variant")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--sanity-images", type=int, default=8)
    p.add_argument("--lite0-sanity-images", type=int, default=3)
    p.add_argument("--no-lite0", action="store_true")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--readings", default=None,
                   help="comma-separated subset, e.g. effective/none/gradient,parameter/max/gradient (default all 12)")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    by_label = {reading_label(r): r for r in READINGS}
    chosen = a.readings.split(",") if a.readings else list(by_label)
    if any(c not in by_label for c in chosen):
        print(f"error: --readings: each of {', '.join(by_label)}", file=sys.stderr)
        return 2
    sizes = {"images": a.images, "sanity_images": a.sanity_images, "lite0_sanity_images": a.lite0_sanity_images,
             "batch_size": a.batch_size, "lite0": not a.no_lite0, "readings": [by_label[c] for c in chosen]}
    if a.claims:
        config = StudyConfig.from_claims(Path(a.claims), Path(a.out), **sizes)
    else:
        checkpoints = dict(m.split("=", 1) for m in a.model)
        unknown = sorted(set(checkpoints) - set(BENCH_ARCHS))
        if unknown or (checkpoints and not a.bench):
            print(f"error: --model needs ARCH=PATH with ARCH in {', '.join(BENCH_ARCHS)} and --bench",
                  file=sys.stderr)
            return 2
        config = StudyConfig(out=Path(a.out), bench=Path(a.bench) if a.bench else None,
                             checkpoints={k: Path(v) for k, v in checkpoints.items()},
                             shortcut_bench=Path(a.shortcut_bench) if a.shortcut_bench else None,
                             shortcut_checkpoint=Path(a.shortcut_model) if a.shortcut_model else None, **sizes)
    run(config, say=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
