"""bench.methods' printed report: the table (one line per method and reference), the reference notes, and the
goals summary (ours/floor, tr_gbp/gbp, speed-up of the iterative methods)."""
from __future__ import annotations

from typing import Any

from bench.method_settings import CORE_METHODS, ITERATIVE_METHODS
from bench.tables import text_table

GOAL_FLOOR = 1.15  # ours / floor of each core method
GOAL_TR_GBP = 3.0  # tr_gbp / gbp (seconds per image)


def format_options(options: dict[str, Any]) -> str:
    """``{"steps": 32, "base_options": {"steps": 8}}`` -> ``steps=32 base_options={steps=8}``."""
    parts = []
    for k, v in options.items():
        parts.append(f"{k}={{{format_options(v)}}}" if isinstance(v, dict) else f"{k}={v}")
    return " ".join(parts)


def _diff_text(ref: dict) -> str:
    """A reference row's ``diff`` cell: "n/a (random)", "~1.2e-03" (approx) or "1.2e-03"."""
    if ref["compare"] == "random":
        return "n/a (random)"
    return ("~" if ref["compare"] == "approx" else "") + f"{ref['max_rel_diff']:.1e}"


def table(rows: list[dict], batch: int | None = None) -> str:
    """The results (rows of :func:`bench.methods.bench_method`; seconds per image) as a text table, one line per
    (method, reference); ``batch``: the full batch, so that rows timed on fewer images say ``[k img]``."""
    head = ("method", "options", "ours s/img", "reference", "ref s/img", "ours/ref", "speed-up", "diff",
            "floor s/img", "ours/floor")
    lines = []
    for row in rows:
        refs = row["references"] or [None]
        opts = format_options(row["options"]) or "-"
        if batch is not None and row["images"] < batch:
            opts += f" [{row['images']} img]"
        for i, ref in enumerate(refs):
            first = i == 0
            name = "-"
            if ref:
                name = ref["name"] + (f" [{ref['images']} img]" if ref["images"] < row["images"] else "")
            lines.append((
                row["method"] if first else "",
                opts if first else "",
                f"{row['ours']['s_per_image']:.4f}" if first else "",
                name,
                f"{ref['s_per_image']:.4f}" if ref else "-",
                f"{ref['ours_over_reference']:.2f}" if ref else "-",
                f"{ref['speedup']:.2f}x" if ref else "-",
                _diff_text(ref) if ref else "-",
                f"{row['floor']['s_per_image']:.4f}" if first else "",
                f"{row['ours_over_floor']:.2f}" if first else "",
            ))
    return text_table(head, lines)


def notes(rows: list[dict]) -> list[str]:
    """One line per reference: how it was configured (and why its maps may differ)."""
    return [f"  {row['method']} / {ref['name']}: {ref['note']}" for row in rows for ref in row["references"]]


def summary(rows: list[dict]) -> tuple[dict, list[str]]:
    """Goals of the core methods (ours/floor, tr_gbp/gbp) and the speed-up of the iterative methods over their
    references: (JSON dict, printable lines)."""
    by_name = {r["method"]: r for r in rows}
    goals: dict[str, Any] = {}
    lines = []
    if "tr_gbp" in by_name and "gbp" in by_name:
        ratio = by_name["tr_gbp"]["ours"]["s_per_image"] / by_name["gbp"]["ours"]["s_per_image"]
        floor_ratio = by_name["tr_gbp"]["floor"]["s_per_image"] / by_name["gbp"]["floor"]["s_per_image"]
        goals["tr_gbp_over_gbp"] = {"value": ratio, "goal": GOAL_TR_GBP, "met": ratio <= GOAL_TR_GBP,
                                    "floor_ratio": floor_ratio}
        lines.append(f"  tr_gbp / gbp = {ratio:.2f}  (goal <= {GOAL_TR_GBP:g}: {'met' if ratio <= GOAL_TR_GBP else 'NOT met'}; "
                     f"the same ratio of the floors: {floor_ratio:.2f})")
    for r in rows:
        if r["method"] not in CORE_METHODS:
            continue
        v = r["ours_over_floor"]
        goals[f"{r['method']}_over_floor"] = {"value": v, "goal": GOAL_FLOOR, "met": v <= GOAL_FLOOR}
        lines.append(f"{r['method']:>8} / floor = {v:.2f}  (goal <= {GOAL_FLOOR:g}: {'met' if v <= GOAL_FLOOR else 'NOT met'}; "
                     f"floor: {r['floor']['passes']})")
    speedups = {}
    for r in rows:
        if r["method"] in ITERATIVE_METHODS and r["references"]:
            speedups[r["method"]] = {ref["name"]: ref["speedup"] for ref in r["references"]}
            lines.append(f"  speed-up of {r['method']} over " + ", ".join(
                f"{ref['name']}: {ref['speedup']:.2f}x" for ref in r["references"]))
    goals["iterative_speedup_over_reference"] = speedups
    return goals, lines


def disturbed_runs(row: dict, max_foreign: float) -> int:
    """Timed runs of ``row`` (ours, floor, references) during which other processes used > ``max_foreign`` cores."""
    entries = [row["ours"], row["floor"], *row["references"]]
    return sum(1 for e in entries for v in e["foreign_cores"] if v is not None and v > max_foreign)
