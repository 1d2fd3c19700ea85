"""Model-based perturbation metrics, batched: MoRF / LeRF (TR-GBP §5.3.2, App. D) and insertion (A-FMI App. A.3).

One primitive, :func:`perturbation_curves`: given a pixel ranking per image and the fractions of pixels to
perturb, it builds every perturbed image of every step of every image (N·S of them) from one ``position`` tensor
(the rank of each pixel, scattered from ``order``: step s of image n perturbs the pixels with
``position[n] < k_s``) and sends them through the model in chunks of ``chunk_size`` under inference mode.
No Python loop over images or steps besides the chunks.

**Counting pixels.** A "pixel" is a spatial position of the map (all C colour channels together). Fraction f
perturbs k = round(f·H·W) pixels (half up), the first k of ``order``.

**Ranking** (:func:`pixel_order`): by the map value, descending for "most relevant first" (MoRF, insertion),
ascending for LeRF; ``by_abs`` ranks by |map| (TR-GBP App. D: for GBP and GIG the LeRF ranking uses |map|, since
their least values are large negative ones that also move the output). Ties: the pixel with the lower flat index
(row-major: top row first, left to right) comes first, in both directions (a stable sort), so the ranking is
deterministic and the same on every device.

**What "removed" / "black" means** (a decision): TR-GBP App. D replaces the k pixels "with zero pixels", A-FMI App.
A.3 starts "with a black image". Both are read as *black in pixel space*, i.e. pixel value 0 in every channel,
which in the model's normalised input space is (0 - mean_c) / std_c per channel (:func:`black_baseline`), not the
normalised 0 (that would be the dataset's mean colour, a grey). Any other fill can be passed as ``baseline``.

**MoRF / LeRF** (:func:`morf_lerf`): mode "remove": start from the image, set the first k pixels of the ranking to
the baseline; curves of the target's logit, softmax probability and top-1 hit at each fraction (typically
0, 0.1, …, 1). A lower MoRF curve and a higher LeRF curve are better. TR-GBP Fig. 6 ("MoRF higher is better, LeRF
lower is better") plots the *change* of the output, i.e. curve(0) - curve(f): take that difference to lay the
numbers out as the paper.

**Insertion** (:func:`insertion`, :func:`insertion_scores`): mode "insert": start from the baseline (black) image
and copy in the first k pixels of the image, at PI = 5, 10, …, 100 % (:func:`insertion_fractions`).
Accuracy@PI = 1 if the perturbed image's argmax is the true class c (per image 0/1; its mean over images is the
paper's accuracy) and Softmax-Ratio@PI = p̂_c / p_c, p_c = softmax probability of c on the unperturbed image. Pass
the *ground-truth* class as target for the paper's protocol. Their areas (:func:`curve_auc`, trapezoid over
PI in [0.05, 1] divided by 0.95) are Accuracy-AUC and Softmax-AUC.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from attribution.errors import AttributionError

MODES = ("remove", "insert")


def black_baseline(preprocessing: Any) -> Tensor:
    """The normalised value of a black pixel: float32 [C] = (0 - mean) / std per channel. ``preprocessing``: an
    object with ``mean`` and ``std`` sequences (attribution.preprocessing.Preprocessing, ModelSpec.preprocessing)."""
    try:
        mean = torch.as_tensor(preprocessing.mean, dtype=torch.float32)
        std = torch.as_tensor(preprocessing.std, dtype=torch.float32)
    except AttributeError as exc:
        raise AttributionError(f"black_baseline: {type(preprocessing).__name__} has no mean/std") from exc
    return (0.0 - mean) / std


def insertion_fractions(steps: int = 20) -> list[float]:
    """PI / 100 for the insertion curve: [1/steps, 2/steps, …, 1] (steps = 20: A-FMI's 5, 10, …, 100 %)."""
    if steps < 1:
        raise AttributionError(f"insertion_fractions: steps must be >= 1, got {steps}")
    return [i / steps for i in range(1, steps + 1)]


def removal_fractions(steps: int = 10) -> list[float]:
    """Fractions for MoRF/LeRF curves: [0, 1/steps, …, 1] (the unperturbed image first)."""
    if steps < 1:
        raise AttributionError(f"removal_fractions: steps must be >= 1, got {steps}")
    return [i / steps for i in range(steps + 1)]


def pixel_order(maps: Tensor, *, most_relevant_first: bool = True, by_abs: bool = False) -> Tensor:
    """Ranking of each map's pixels: LongTensor [N, H*W] of flat indices (i·W + j) from maps [N, H, W].

    Descending map value when ``most_relevant_first`` (MoRF, insertion), ascending otherwise (LeRF); ``by_abs``
    ranks |map|. Ties: lower flat index first, in both directions (stable sort). NaN in a map is an error."""
    if not isinstance(maps, Tensor) or maps.ndim != 3:
        raise AttributionError("pixel_order: maps must be a tensor [N, H, W], got "
                               f"{tuple(getattr(maps, 'shape', ())) or type(maps).__name__}")
    scores = maps.reshape(maps.shape[0], -1)
    if scores.is_floating_point() and torch.isnan(scores).any():
        bad = int(torch.isnan(scores).any(dim=1).nonzero()[0])
        raise AttributionError(f"pixel_order: map {bad} holds NaN values")
    if by_abs:
        scores = scores.abs()
    return torch.sort(scores, dim=1, descending=most_relevant_first, stable=True).indices


def _pixel_counts(fractions: Sequence[float], pixels: int) -> list[int]:
    out = []
    for f in fractions:
        f = float(f)
        if not 0.0 <= f <= 1.0:
            raise AttributionError(f"fractions must lie in [0, 1], got {f}")
        out.append(min(pixels, math.floor(f * pixels + 0.5)))
    return out


def _baseline_tensor(baseline: Tensor | float | Sequence[float], images: Tensor) -> Tensor:
    """[1 or N, C, H, W] (broadcastable to the images), on the images' device and dtype."""
    n, c, h, w = images.shape
    b = torch.as_tensor(baseline, dtype=images.dtype, device=images.device)
    if b.ndim == 0:
        return b.expand(1, c, 1, 1)
    if b.ndim == 1 and b.shape[0] == c:
        return b.view(1, c, 1, 1)
    if b.ndim == 3 and tuple(b.shape) == (c, h, w):
        return b[None]
    if b.ndim == 4 and tuple(b.shape) == (n, c, h, w):
        return b
    raise AttributionError(f"baseline of shape {tuple(b.shape)} does not fit images {tuple(images.shape)}: "
                           f"give a scalar, [{c}], [{c}, {h}, {w}] or [{n}, {c}, {h}, {w}]")


def _positions(order: Tensor, pixels: int) -> Tensor:
    """position[n, p] = rank of pixel p in order[n]; checks that every row is a permutation of 0..P-1."""
    if order.dtype not in (torch.int64, torch.int32) or order.ndim != 2 or order.shape[1] != pixels:
        raise AttributionError(f"order must be an integer tensor [N, {pixels}], got {order.dtype} "
                               f"{tuple(order.shape)}")
    order = order.long()
    if order.numel() and (int(order.min()) < 0 or int(order.max()) >= pixels):
        raise AttributionError(f"order holds pixel indices outside 0..{pixels - 1}")
    ranks = torch.arange(pixels, device=order.device).expand_as(order)
    position = torch.full_like(order, -1).scatter_(1, order, ranks)
    if bool((position < 0).any()):
        bad = int((position < 0).any(dim=1).nonzero()[0])
        raise AttributionError(f"order row {bad} is not a permutation of the {pixels} pixels (repeated indices)")
    return position


def _curves(model: Callable[[Tensor], Tensor], images: Tensor, image_of: Tensor, order: Tensor, targets: Tensor,
            fractions: Sequence[float], mode: str, baseline: Tensor | float | Sequence[float],
            chunk_size: int) -> dict[str, Tensor]:
    """perturbation_curves for rows r whose image is images[image_of[r]] (so MoRF and LeRF share the images)."""
    if mode not in MODES:
        raise AttributionError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(images, Tensor) or images.ndim != 4:
        raise AttributionError("images must be a tensor [N, C, H, W], got "
                               f"{tuple(getattr(images, 'shape', ())) or type(images).__name__}")
    if chunk_size < 1:
        raise AttributionError(f"chunk_size must be >= 1, got {chunk_size}")
    h, w = images.shape[2:]
    device = images.device
    rows = order.shape[0] if isinstance(order, Tensor) else -1
    position = _positions(order.to(device) if isinstance(order, Tensor) else torch.as_tensor(order), h * w)
    targets = torch.as_tensor(targets, device=device).long().reshape(-1)
    if targets.shape[0] != rows:
        raise AttributionError(f"{targets.shape[0]} targets for {rows} rows of order")
    counts = torch.tensor(_pixel_counts(fractions, h * w), device=device, dtype=torch.long)
    steps = counts.shape[0]
    base = _baseline_tensor(baseline, images)
    per_image_base = base.shape[0] > 1
    logit = torch.empty(rows, steps, device=device)
    prob = torch.empty(rows, steps, device=device)
    top1 = torch.empty(rows, steps, device=device)
    with torch.inference_mode():
        total = rows * steps
        for start in range(0, total, chunk_size):
            pair = torch.arange(start, min(start + chunk_size, total), device=device)
            r, s = pair // steps, pair % steps
            n = image_of[r]
            chosen = (position[r] < counts[s][:, None]).view(-1, 1, h, w)  # True = pixel among the first k
            x = images[n]
            fill = base[n] if per_image_base else base
            batch = torch.where(chosen, fill, x) if mode == "remove" else torch.where(chosen, x, fill)
            out = model(batch)
            if not isinstance(out, Tensor) or out.ndim != 2:
                raise AttributionError(f"the model must return logits [B, classes], got "
                                       f"{tuple(getattr(out, 'shape', ())) or type(out).__name__}")
            if start == 0 and rows and (int(targets.max()) >= out.shape[1] or int(targets.min()) < 0):
                raise AttributionError(f"a target is outside the model's {out.shape[1]} classes")
            t = targets[r]
            out = out.float()
            logit[r, s] = out.gather(1, t[:, None])[:, 0]
            prob[r, s] = out.softmax(dim=1).gather(1, t[:, None])[:, 0]
            top1[r, s] = (out.argmax(dim=1) == t).float()
    return {"logit": logit, "prob": prob, "top1": top1}


def perturbation_curves(model: Callable[[Tensor], Tensor], images: Tensor, order: Tensor, targets: Tensor,
                        fractions: Sequence[float], *, mode: str = "remove",
                        baseline: Tensor | float | Sequence[float],
                        chunk_size: int = 64) -> dict[str, Tensor]:
    """The model's response as pixels are removed or inserted in ranking order, for every image and fraction.

    ``model``: callable normalised images [B, C, H, W] -> logits [B, classes] (called under inference mode; an
    ``nn.Module`` should be in eval mode, it is not changed here). ``images``: normalised [N, C, H, W];
    ``order``: LongTensor [N, H*W] (:func:`pixel_order`); ``targets``: LongTensor [N] (class per image);
    ``fractions``: S values in [0, 1] (k = round(f·H·W) pixels). ``mode``: "remove" = start from the image and
    set the first k pixels (all channels) to the baseline; "insert" = start from the baseline and copy in the
    first k pixels of the image. ``baseline``: the fill in normalised units, a scalar, [C] (e.g.
    :func:`black_baseline`), [C, H, W] or [N, C, H, W]. ``chunk_size``: perturbed images per forward pass (the
    results do not depend on it beyond float rounding of batched kernels).

    Returns float32 tensors [N, S] on the images' device: "logit" (the target's logit), "prob" (its softmax
    probability) and "top1" (1.0 where the argmax is the target, else 0.0)."""
    if not isinstance(images, Tensor) or images.ndim != 4:
        raise AttributionError("images must be a tensor [N, C, H, W], got "
                               f"{tuple(getattr(images, 'shape', ())) or type(images).__name__}")
    if not isinstance(order, Tensor) or order.ndim != 2 or order.shape[0] != images.shape[0]:
        raise AttributionError(f"order {tuple(getattr(order, 'shape', ()))} must be [N, H*W] for images "
                               f"{tuple(images.shape)}")
    image_of = torch.arange(images.shape[0], device=images.device)
    return _curves(model, images, image_of, order, targets, fractions, mode, baseline, chunk_size)


def morf_lerf(model: Callable[[Tensor], Tensor], images: Tensor, maps: Tensor, targets: Tensor,
              fractions: Sequence[float], *, baseline: Tensor | float | Sequence[float],
              lerf_by_abs: bool | Tensor = False, chunk_size: int = 64) -> dict[str, dict[str, Tensor]]:
    """MoRF and LeRF curves (TR-GBP §5.3.2, App. D) in one batched pass over both rankings.

    ``maps``: [N, H, W] (the target's map of each image); ``lerf_by_abs``: rank LeRF by |map| (bool, or a bool
    tensor [N] per image, e.g. True for GBP/GIG maps). Other arguments as :func:`perturbation_curves` with mode
    "remove" (``baseline``: use :func:`black_baseline` for the papers' black pixels). Returns
    {"morf": curves, "lerf": curves}, each a dict of float32 [N, S] tensors "logit", "prob", "top1"."""
    if not isinstance(maps, Tensor) or not isinstance(images, Tensor) or maps.ndim != 3 or images.ndim != 4 \
            or maps.shape[0] != images.shape[0] or maps.shape[1:] != images.shape[2:]:
        raise AttributionError(f"maps {tuple(getattr(maps, 'shape', ()))} must be [N, H, W] for images "
                               f"{tuple(getattr(images, 'shape', ()))}")
    n = images.shape[0]
    maps = maps.to(images.device)
    morf = pixel_order(maps, most_relevant_first=True)
    lerf = pixel_order(maps, most_relevant_first=False)
    by_abs = torch.as_tensor(lerf_by_abs, device=images.device, dtype=torch.bool).expand(n)
    if bool(by_abs.any()):
        lerf = torch.where(by_abs[:, None], pixel_order(maps, most_relevant_first=False, by_abs=True), lerf)
    targets = torch.as_tensor(targets, device=images.device).long().reshape(-1)
    if targets.shape[0] != n:
        raise AttributionError(f"{targets.shape[0]} targets for {n} images")
    image_of = torch.arange(n, device=images.device).repeat(2)
    curves = _curves(model, images, image_of, torch.cat([morf, lerf]), targets.repeat(2), fractions, "remove",
                     baseline, chunk_size)
    return {"morf": {k: v[:n] for k, v in curves.items()}, "lerf": {k: v[n:] for k, v in curves.items()}}


def curve_auc(curves: Tensor, fractions: Sequence[float]) -> Tensor:
    """Normalised area under each curve: float64 [N] from curves [N, S] at the S increasing ``fractions``.
    Trapezoidal rule divided by the x-range (fractions[-1] - fractions[0]), so a constant curve c has AUC c;
    a single point (S = 1) is its own AUC. NaN in a curve gives NaN."""
    x = torch.as_tensor([float(f) for f in fractions], dtype=torch.float64)
    if not isinstance(curves, Tensor) or curves.ndim != 2 or curves.shape[1] != x.shape[0]:
        raise AttributionError(f"curve_auc: curves {tuple(getattr(curves, 'shape', ()))} do not match "
                               f"{x.shape[0]} fractions")
    y = curves.to(torch.float64)
    if x.shape[0] == 1:
        return y[:, 0]
    if not bool((x[1:] > x[:-1]).all()):
        raise AttributionError(f"curve_auc: fractions must be strictly increasing, got {x.tolist()}")
    x = x.to(y.device)
    area = ((y[:, 1:] + y[:, :-1]) / 2 * (x[1:] - x[:-1])).sum(dim=1)
    return area / (x[-1] - x[0])


def insertion_scores(curves: dict[str, Tensor], reference_prob: Tensor,
                     fractions: Sequence[float] | None = None) -> dict[str, Tensor]:
    """A-FMI's insertion protocols per image from insertion curves (:func:`perturbation_curves`, mode "insert",
    targets = true classes). ``reference_prob``: [N], the true class's softmax probability on the unperturbed
    image. Returns "accuracy" [N, S] (Accuracy@PI per image, 0/1: its mean over images is the paper's
    Classification Accuracy@PI) and "softmax_ratio" [N, S] (p̂_c / p_c; mean over images = Softmax Ratio@PI),
    and with ``fractions`` also "accuracy_auc" and "softmax_ratio_auc" [N] (:func:`curve_auc`)."""
    prob, top1 = curves["prob"], curves["top1"]
    ref = torch.as_tensor(reference_prob, device=prob.device, dtype=torch.float64).reshape(-1)
    if ref.shape[0] != prob.shape[0]:
        raise AttributionError(f"insertion_scores: {ref.shape[0]} reference probabilities for "
                               f"{prob.shape[0]} curves")
    out = {"accuracy": top1.to(torch.float64), "softmax_ratio": prob.to(torch.float64) / ref[:, None]}
    if fractions is not None:
        out["accuracy_auc"] = curve_auc(out["accuracy"], fractions)
        out["softmax_ratio_auc"] = curve_auc(out["softmax_ratio"], fractions)
    return out


def target_probability(model: Callable[[Tensor], Tensor], images: Tensor, targets: Tensor, *,
                       chunk_size: int = 64) -> Tensor:
    """Softmax probability of each image's target on the unperturbed images: float32 [N] (inference mode)."""
    targets = torch.as_tensor(targets, device=images.device).long().reshape(-1)
    out = []
    with torch.inference_mode():
        for start in range(0, images.shape[0], chunk_size):
            logits = model(images[start:start + chunk_size]).float()
            out.append(logits.softmax(dim=1).gather(1, targets[start:start + chunk_size, None])[:, 0])
    return torch.cat(out) if out else torch.empty(0, device=images.device)


def insertion(model: Callable[[Tensor], Tensor], images: Tensor, maps: Tensor, targets: Tensor, *,
              baseline: Tensor | float | Sequence[float], steps: int = 20,
              chunk_size: int = 64) -> dict[str, Tensor]:
    """A-FMI App. A.3 end to end: rank each map's pixels (most relevant first), insert the top PI % into the
    baseline (black: :func:`black_baseline`) at PI = 100/steps, …, 100 %, and score. ``images`` normalised
    [N, C, H, W], ``maps`` [N, H, W], ``targets`` [N] (the true classes). Returns :func:`insertion_scores` with
    AUCs, plus the raw curves "logit", "prob", "top1" [N, S] and "fractions" (float64 [S])."""
    fractions = insertion_fractions(steps)
    order = pixel_order(maps.to(images.device), most_relevant_first=True)
    curves = perturbation_curves(model, images, order, targets, fractions, mode="insert", baseline=baseline,
                                 chunk_size=chunk_size)
    reference = target_probability(model, images, targets, chunk_size=chunk_size)
    scores = insertion_scores(curves, reference, fractions)
    return {**scores, **curves, "fractions": torch.tensor(fractions, dtype=torch.float64)}


__all__ = ["MODES", "black_baseline", "curve_auc", "insertion", "insertion_fractions", "insertion_scores",
           "morf_lerf", "perturbation_curves", "pixel_order", "removal_fractions", "target_probability"]
