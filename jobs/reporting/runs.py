"""Reading the output directories the report is built from: evaluate, attribute and sanity runs.

A run is recognised by ``manifest.json``'s ``"job"``. Only committed rows are read (``schemas.reader``), and of an
evaluate or attribute run only the primary maps' rows (jobs.reporting.aggregates.PRIMARY);
the sanity job's rows are read from its committed files when it keeps commit records, else from every Parquet
file under ``sanity/``. Maps are never loaded here (the grids fetch the few they draw).
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from jobs.common import JobError
from jobs.reporting.aggregates import PRIMARY
from workers.shards import shard_name
from schemas.reader import OutputReader
from schemas.storage import StorageError, first_line

KINDS = ("evaluate", "attribute", "sanity")
# Attribution columns the report keeps in memory for every primary row: what the times (aggregates) and the grid's
# choice of images need. The grid reads its few images' maps, targets and top-5 itself; a list column such as top5 costs
# ~115 bytes a row as pandas objects (73 MB for 640,000 rows, bench/report_scale.py's 8,000 images).
ATTRIBUTION_COLUMNS = ["key", "shard", "model", "weights", "method", "options", "target_kind", "target_rank",
                       "seconds"]
SANITY_FIGURE_SUFFIX = ".png"


@dataclass
class Run:
    """One output directory. ``rows``: its committed table as pandas (the primary maps' metric rows for evaluate,
    their attribution metadata without maps for attribute, similarity rows for sanity); ``dataset_metrics``: evaluate's
    dataset-level rows (may be empty); ``figures``: PNG files at a sanity run's root (URIs/paths)."""

    kind: str
    uri: str
    manifest: dict
    rows: pd.DataFrame
    dataset_metrics: pd.DataFrame = field(default_factory=pd.DataFrame)
    figures: list[str] = field(default_factory=list)

    @property
    def models(self) -> list[str]:
        """Model names found in the rows (sorted)."""
        return sorted(set(self.rows["model"])) if "model" in self.rows else []

    @property
    def images(self) -> int:
        """Number of distinct (shard, key) images in the rows."""
        return int(self.rows[["shard", "key"]].drop_duplicates().shape[0]) if len(self.rows) else 0

    @property
    def started(self) -> str:
        """When the run started (manifest ``started``), '' when unknown."""
        return str(self.manifest.get("started", ""))

    @property
    def status(self) -> str:
        """The manifest's status ('complete', 'incomplete', …), '' when unknown."""
        return str(self.manifest.get("status", ""))

    @property
    def precision(self) -> str:
        """The compute precision the run's config recorded (fp32 where it records none)."""
        return str(self.manifest.get("config", {}).get("precision") or "fp32")

    @property
    def hardware(self) -> str:
        """What the run computed on (manifest ``hardware``, jobs.common.cluster_hardware), e.g. "8 GPU (A10G), 32
        CPU" or "2 CPU"; '' for a run that recorded none."""
        hw = self.manifest.get("hardware")
        if not isinstance(hw, dict):
            return ""
        cpus = f"{hw.get('cpus', 0):g} CPU"
        if not hw.get("gpus"):
            return cpus
        types = f" ({', '.join(hw['gpu_types'])})" if hw.get("gpu_types") else ""
        return f"{hw['gpus']:g} GPU{types}, {cpus}"

    def shard_uris(self) -> dict[str, str]:
        """Shard file name -> URI of the input shards this run recorded (its manifest's shards and config)."""
        uris: dict[str, str] = {}
        for uri in self.manifest.get("config", {}).get("shards", []) or []:
            if isinstance(uri, str):
                uris[shard_name(uri)] = uri
        for name, entry in (self.manifest.get("shards") or {}).items():
            if isinstance(entry, dict) and isinstance(entry.get("uri"), str):
                uris[name] = entry["uri"]
        return uris

    def attributions_uri(self) -> str | None:
        """The attribution run an evaluate run was computed from (its config), else None."""
        value = self.manifest.get("config", {}).get("attributions")
        return value if self.kind == "evaluate" and isinstance(value, str) else None


def display_uri(uri: str) -> str:
    """Absolute local path, or the URI unchanged."""
    return uri if "://" in uri else str(Path(uri).resolve())


def load_run(uri: str) -> Run:
    """Read one run directory (local path or URI). JobError (one line) when it is not a run of a known job,
    or has no committed rows; StorageError (one line) when the location cannot be reached."""
    uri = display_uri(uri)
    store = OutputReader(uri)
    try:
        info = store.fs.get_file_info(store.root)
    except OSError as exc:
        raise StorageError(f"cannot read {uri}: {first_line(exc)}") from None
    if info.type != pafs.FileType.Directory:
        raise JobError(f"{uri} is not a directory")
    try:
        manifest = store.read_json("manifest.json")
    except ValueError as exc:
        raise JobError(f"{uri}/manifest.json is not valid JSON: {exc}") from None
    if not manifest:
        raise JobError(f"{uri} is not a run: no manifest.json (expected the output of jobs.evaluate, "
                       "jobs.attribute or jobs.sanity)")
    kind = manifest.get("job") if isinstance(manifest, dict) else None
    if kind not in KINDS:
        raise JobError(f"{uri}/manifest.json has job {kind!r}; the report reads {', '.join(KINDS)} runs")
    if kind == "evaluate":
        return _evaluate_run(uri, store, manifest)
    if kind == "attribute":
        return _attribute_run(uri, store, manifest)
    return _sanity_run(uri, store, manifest)


def _evaluate_run(uri: str, store: OutputReader, manifest: dict) -> Run:
    # only the primary maps' rows enter the report (aggregates module docstring): the others of a top-5 run (~half
    # of its rows: EBPG and IBD of the other 4 maps) are dropped while the files are read
    table = store.read("metrics", where=PRIMARY)
    if table.num_rows == 0:
        raise JobError(f"{uri} is an empty evaluate run: no committed metric rows (run or finish jobs.evaluate)")
    dataset = pd.DataFrame()
    path = store.path("dataset_metrics.parquet")
    if store.fs.get_file_info(path).type == pafs.FileType.File:
        dataset = pq.read_table(path, filesystem=store.fs).to_pandas()
    return Run("evaluate", uri, manifest, table.to_pandas(), dataset)


def _attribute_run(uri: str, store: OutputReader, manifest: dict) -> Run:
    files = store.committed_files("attributions")
    if not files:
        raise JobError(f"{uri} is an empty attribution run: no committed shards (run or finish jobs.attribute)")
    table = store.read(columns=ATTRIBUTION_COLUMNS, where=PRIMARY)  # a top-5 run: 1 row in 5
    if table.num_rows == 0:
        raise JobError(f"{uri} is an empty attribution run: its committed shards hold no maps")
    return Run("attribute", uri, manifest, table.to_pandas())


def _sanity_run(uri: str, store: OutputReader, manifest: dict) -> Run:
    committed = store.committed_files("sanity")
    if committed:
        files = [store.path(f) for f in committed]
    else:
        files = [info.path for info in _walk(store, store.path("sanity"))
                 if info.base_name.endswith(".parquet") and "/_staging/" not in info.path]
    if not files:
        raise JobError(f"{uri} is an empty sanity run: no Parquet rows under sanity/ (run or finish jobs.sanity)")
    table = pa.concat_tables([pq.read_table(f, filesystem=store.fs) for f in sorted(files)])
    if table.num_rows == 0:
        raise JobError(f"{uri} is an empty sanity run: its sanity/ files hold no rows")
    figures = sorted(info.path for info in store.fs.get_file_info(pafs.FileSelector(store.root))
                     if info.type == pafs.FileType.File and info.base_name.endswith(SANITY_FIGURE_SUFFIX))
    if "://" in uri:
        figures = [posixpath.join(uri.rstrip("/"), posixpath.basename(f)) for f in figures]
    return Run("sanity", uri, manifest, table.to_pandas(), figures=figures)


def _walk(store: OutputReader, directory: str) -> list[pafs.FileInfo]:
    if store.fs.get_file_info(directory).type != pafs.FileType.Directory:
        return []
    return [info for info in store.fs.get_file_info(pafs.FileSelector(directory, recursive=True))
            if info.type == pafs.FileType.File]


def load_runs(uris: list[str], follow_attributions: bool = True) -> tuple[list[Run], list[str]]:
    """Load every run in ``uris`` (duplicates once), plus, with ``follow_attributions``, the attribution runs
    that the evaluate runs were computed from when they are readable and not given. Returns (runs, notes);
    a note says what was skipped and why. JobError for a given directory that is not a usable run."""
    runs: list[Run] = []
    seen: set[str] = set()
    notes: list[str] = []
    for uri in uris:
        key = display_uri(uri)
        if key in seen:
            continue
        seen.add(key)
        runs.append(load_run(key))
    if follow_attributions:
        for run in list(runs):
            source = run.attributions_uri()
            if source is None or display_uri(source) in seen:
                continue
            seen.add(display_uri(source))
            try:
                runs.append(load_run(source))
            except JobError as exc:
                notes.append(f"the attribution run of {run.uri} was not read ({exc}); no heatmap grid from it")
    return runs, notes


__all__ = ["ATTRIBUTION_COLUMNS", "KINDS", "Run", "display_uri", "load_run", "load_runs"]
