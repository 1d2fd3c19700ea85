"""bench.scale's inputs and checks: the benchmark's val split as tar shards, a random-init checkpoint of a benchmark
model, the sample keys every run must cover, and afterwards the files and rows an output directory holds."""
from __future__ import annotations

import glob
import json
import math
import os
import shutil
import tarfile
import time
from collections import Counter
from pathlib import Path


def prepare_shards(work: Path, images: int, shards: int, size: int, seed: int = 0) -> dict:
    """The benchmark's val split, ``images`` images of ``size`` x ``size`` px, as ``shards`` tar shards of
    ``ceil(images / shards)`` images under ``work/shards-<images>-<shards>-<size>-s<seed>``; reused when ``done.json``
    there records the same configuration. Returns done.json's record (config, generation ``seconds``,
    ``images_per_second``, ``shard_files``, ``bytes`` on disk, ``border_px``) plus ``cached`` (bool) and ``uris``
    (the shard paths, sorted)."""
    from attribution.data import benchmark
    from jobs.make_benchmark import make_benchmark

    per_shard = math.ceil(images / shards)
    directory = work / f"shards-{images}-{shards}-{size}-s{seed}"
    marker = directory / "done.json"
    wanted = {"images": images, "shards": shards, "size": size, "seed": seed, "per_shard": per_shard}
    if marker.exists() and json.loads(marker.read_text()).get("config") == wanted:
        done = json.loads(marker.read_text())
        return {**done, "cached": True, "uris": sorted(glob.glob(str(directory / "val-*.tar")))}
    if directory.exists():
        shutil.rmtree(directory)
    start = time.perf_counter()
    make_benchmark(directory, benchmark.BenchmarkConfig(size=size, seed=seed), {"val": images}, per_shard,
                   log=lambda *_: None)
    seconds = time.perf_counter() - start
    uris = sorted(glob.glob(str(directory / "val-*.tar")))
    done = {"config": wanted, "seconds": round(seconds, 2), "images_per_second": round(images / seconds, 1),
            "shard_files": len(uris), "bytes": sum(os.path.getsize(u) for u in uris),
            "border_px": benchmark.border_width(size)}
    marker.write_text(json.dumps(done, indent=1))
    return {**done, "cached": False, "uris": uris}


def prepare_weights(work: Path, model: str, size: int) -> str | None:
    """A random-init checkpoint of a benchmark model at ``size`` x ``size`` px input (so it reads the shards
    unresized), cached as ``work/<model>-<size>px-random.pt``; returns its path, or None for the other zoo models
    (random init, their own preprocessing)."""
    import torch

    from attribution import models
    from attribution.architectures import small_cnn

    if model not in models.BENCH_MODELS:
        return None
    path = work / f"{model}-{size}px-random.pt"
    if not path.exists():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            module = small_cnn.build(model, models.BENCH_DEFAULT_CLASSES, size)
        checkpoint = small_cnn.checkpoint(module, mean=models.IMAGENET_MEAN, std=models.IMAGENET_STD,
                                          class_names=[f"class{i}" for i in range(module.num_classes)],
                                          training={"note": "random init (bench.scale)"})
        torch.save(checkpoint, path)
    return str(path)


def shard_keys(uris: list[str]) -> dict[str, list[str]]:
    """{shard file name: its sample keys, sorted} from the tar headers of ``uris`` (what every run must cover
    exactly once)."""
    keys = {}
    for uri in uris:
        with tarfile.open(uri) as tar:
            keys[os.path.basename(uri)] = sorted({m.name.split(".", 1)[0] for m in tar.getmembers() if m.isfile()})
    return keys



def files_report(out: Path) -> dict:
    """Files and bytes under an output directory: ``files`` (count) and ``bytes`` in all, and ``by_kind``
    {top-level entry (attributions, errors, metrics, _commits, manifest.json, …): {"files", "bytes"}}."""
    kinds: dict[str, dict] = {}
    for path in out.rglob("*"):
        if path.is_file():
            kind = path.relative_to(out).parts[0]
            entry = kinds.setdefault(kind, {"files": 0, "bytes": 0})
            entry["files"] += 1
            entry["bytes"] += path.stat().st_size
    return {"files": sum(k["files"] for k in kinds.values()), "bytes": sum(k["bytes"] for k in kinds.values()),
            "by_kind": kinds}


def verify(out: Path, kind: str, expected: dict[str, list[str]], per_image: int, group: list[str]) -> dict:
    """Every committed file of ``kind`` ("attributions", "metrics") read with pyarrow: rows per ``group`` (column
    names) counted; the keys ``expected`` ({shard file name: keys}) of every shard present ``per_image`` times;
    files on disk that no commit record lists (stray) counted. Returns counts (commit records, files, rows,
    distinct groups, duplicates, missing, unexpected, images covered, stray / listed-but-absent / staging files)
    and ``ok``: no duplicate, missing, unexpected, stray or absent one."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    records = [json.loads(p.read_text()) for p in sorted((out / "_commits").glob("*.json"))]
    files = [f for r in records for f in r["files"] if f.startswith(kind + "/")]
    table = pa.concat_tables([pq.read_table(out / f, columns=group) for f in files]) if files else None
    on_disk = {str(p.relative_to(out)) for k in ("attributions", "errors", "metrics", "npz")
               for p in (out / k).rglob("*") if p.is_file()}
    listed = {f for r in records for f in r["files"]}
    report = {"commit_records": len(records), "files": len(files), "rows": table.num_rows if table else 0,
              "stray_files": len(on_disk - listed), "listed_but_absent": len(listed - on_disk),
              "staging_files": sum(1 for p in (out / "_staging").rglob("*") if p.is_file())
              if (out / "_staging").exists() else 0}
    if table is None:
        return {**report, "duplicates": 0, "missing": sum(len(k) for k in expected.values()), "ok": False}
    counts = table.group_by(group).aggregate([([], "count_all")])
    report["distinct"] = counts.num_rows
    report["duplicates"] = int(pc.sum(pc.subtract(counts["count_all"], 1)).as_py() or 0)
    present = Counter(zip(table["shard"].to_pylist(), table["key"].to_pylist()))
    want = [(s, k) for s, keys in expected.items() for k in keys]
    report["missing"] = sum(1 for pair in want if present.get(pair, 0) < per_image)
    report["unexpected"] = len(set(present) - set(want))
    report["images_covered"] = sum(1 for pair in want if present.get(pair, 0) >= per_image)
    report["ok"] = (report["duplicates"] == 0 and report["missing"] == 0 and report["unexpected"] == 0
                    and report["stray_files"] == 0 and report["listed_but_absent"] == 0)
    return report

