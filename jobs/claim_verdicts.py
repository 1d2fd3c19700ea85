"""The papers' claims as verdicts on measured runs: each claim compares numbers in the direction the paper states
(jobs.claims runs the chain that produces the runs; this module only reads them and judges)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

METHODS = ("saliency", "gbp", "gradcam", "tr_gbp", "a_fmi")
REFERENCES = ("black", "white", "random")
REFERENCE_METHODS = {"a_fmi": "reference", "ig": "baseline", "deeplift": "baseline"}
# bench_vgg_plain: conv biases, no BatchNorm; bench_lite0: EfficientNet-Lite0 fine-tuned from its ImageNet weights,
# the benchmark's stand-in for an ImageNet-trained CNN (issue 16, README "TR-GBP readings")
ARCHS = ("bench_resnet", "bench_vgg", "bench_vgg_plain", "bench_lite0")


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


def evaluate_claims(runs: dict[str, Path], seed: int = 0) -> list[Claim]:
    """Every claim of the two papers that the runs can test, from their metric, sanity and map tables (named as
    jobs.claims names its runs: ``metrics_<arch>``, ``sanity_<arch>``, ``road_<arch>``, …); ``seed``: EBPG's
    protocol draws."""
    from attribution.metrics.protocols import ebpg_protocol, ibd_auc_protocol

    claims: list[Claim] = []
    for arch in ARCHS:
        m = _metrics(runs[f"metrics_{arch}"])
        cd = _mean(m, "class_discrimination")
        claims.append(less("TR-GBP", "TR-GBP is class-sensitive where GBP is not (class discrimination: mean "
                            "rank correlation of the top-5 class maps, lower = more class-sensitive)", arch,
                            "tr_gbp", cd.get("tr_gbp"), "gbp", cd.get("gbp")))
        final = _sanity_change(runs[f"sanity_{arch}"])
        claims.append(less("TR-GBP", "TR-GBP changes under cascading randomisation where GBP barely does "
                            "(Spearman |map| to the original, mean over all cascading steps)", arch,
                            "tr_gbp", final.get("tr_gbp"), "gbp", final.get("gbp")))
        eligible = m[(m.metric == "ebpg") & (m.n_boxes == 1) & (m.box_share < 0.5)].sort_values(["shard", "key"])
        ebpg = {method: ebpg_protocol(g.value.to_numpy(dtype=float), sample=500, repeats=5, seed=seed)[0]
                for method, g in eligible.groupby("method")}
        tr, gbp = ebpg.get("tr_gbp"), ebpg.get("gbp")
        others = {k: ebpg.get(k) for k in ("saliency", "gradcam")}
        holds = None if tr is None or gbp is None or None in others.values() else \
            bool(tr >= 0.9 * gbp and all(tr > v for v in others.values()))
        claims.append(Claim("TR-GBP", "EBPG of TR-GBP is competitive with GBP (≥ 0.9×) and above Saliency and "
                            "Grad-CAM (Table 1)", arch, _fmt(ebpg, ("tr_gbp", "gbp", "saliency", "gradcam")),
                            holds))
        ins = _mean(m, "insertion_accuracy")
        claims.append(less("A-FMI", "A-FMI ≥ Grad-CAM on insertion Accuracy-AUC (Table 1)", arch,
                            "gradcam", ins.get("gradcam"), "a_fmi", ins.get("a_fmi"), or_equal=True))
        claims.append(_reference_claim(runs, arch))
        if f"road_{arch}" in runs:
            claims += _road_claims(runs[f"road_{arch}"], arch)
        claims.append(_fmi_claim(runs[f"fmi_{arch}"], arch))
    gaps = {arch: _mean(_metrics(runs[f"metrics_{arch}"]), "insertion_accuracy") for arch in ARCHS}
    gap = {arch: (g.get("a_fmi", np.nan) - g.get("gradcam", np.nan)) for arch, g in gaps.items()}
    claims.append(less("A-FMI", "A-FMI's insertion advantage over Grad-CAM is largest on the VGG-style head "
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
        claims.append(less("TR-GBP", "class-discriminative top-5 maps on a real ImageNet model", "efficientnet_lite0,"
                            " real photos", "tr_gbp", cd.get("tr_gbp"), "gbp", cd.get("gbp")))
        final = _sanity_change(runs["sanity_lite0"])
        claims.append(less("TR-GBP", "cascading randomisation changes TR-GBP, barely GBP, on a real ImageNet "
                            "model", "efficientnet_lite0, real photos", "tr_gbp", final.get("tr_gbp"), "gbp",
                            final.get("gbp")))
    return claims


def _reference_claim(runs: dict[str, Path], arch: str) -> Claim:
    """A-FMI §4.2: mean over images and over the 3 pairs of references of the Spearman correlation of the maps."""
    from attribution.metrics.discrimination import class_discrimination
    from schemas.reader import maps_of, read_table

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
                claim = less("TR-GBP", f"TR-GBP outperforms Grad-CAM on MoRF (Fig. 6; AUC of the target "
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
    from schemas.reader import read_table
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


def less(paper: str, claim: str, setting: str, low_name: str, low: float | None, high_name: str,
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


def write_claims(out: Path, claims: Sequence[Claim]) -> None:
    rows = [c.as_row() for c in claims]
    (out / "claims.json").write_text(json.dumps(rows, indent=2))
    pd.DataFrame(rows).to_csv(out / "claims.csv", index=False)
    (out / "claims.md").write_text(claims_markdown(claims) + "\n")
