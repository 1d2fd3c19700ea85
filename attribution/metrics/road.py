"""ROAD (Rong, Leemann et al., ICML 2022): MoRF / LeRF with *noisy linear imputation* instead of black pixels,
batched over images and steps in torch (GPU or CPU: everything follows the inputs' device).

Black pixels leak the shape of the removed region to the model (a classifier trained on the masks alone predicts
the class), so ROAD fills every removed pixel with the weighted mean of its 8 neighbours — weights 1/6 for the
4 side neighbours and 1/12 for the 4 diagonals — solved jointly over all removed pixels, plus Gaussian noise.

**The system** (the authors' ``road/imputations.py`` ``NoisyLinearImputer``, also in pytorch-grad-cam and Quantus):
for every removed pixel i, with N(i) its neighbours *inside* the image and R the removed set,

    d_i x_i - sum_{j in N(i) ∩ R} w_ij x_j = sum_{j in N(i) \\ R} w_ij v_j,      d_i = sum_{j in N(i)} w_ij,

i.e. x_i is the weighted mean of its neighbours with the weights renormalised by the weight that lies inside
the image. **Boundary handling** (as the reference): neighbours outside the image are left out and their weight
is removed from d_i (d = 1 inside, 2/3 on an edge, 5/12 in a corner); no padding value enters. Each colour
channel is its own system with the same matrix. The matrix is a principal submatrix of the weighted 8-neighbour
graph Laplacian of the pixel grid, hence symmetric positive definite as soon as one pixel is kept (every
connected removed region touches a kept pixel); removing every pixel is singular and rejected.

**Solver** (:mod:`attribution.metrics.road_solver`): conjugate gradients on all N·C systems at once (one per
image and channel; the operator is an 8-neighbour stencil on [N, C, H, W] tensors, masked to the removed pixels),
preconditioned by a geometric multigrid V-cycle, in float64 by default. Each system stops when the largest
absolute residual of its equations is at most ``tol`` (the images' units; stopped systems leave the working set,
so the rest does not pay for them); the loop ends when all have stopped or after ``max_iter`` iterations, and the
true residual ``b - A x`` of the returned solution is recomputed and reported (:class:`ImputationInfo`). Default
``tol`` = 1e-8: the error is at most ~100× the residual on the hardest case measured (a 224-px hole, MoRF 90 % of
a smooth map: error ~1e-6), 100× inside the 1e-4 asked for. The multigrid preconditioner needs 8-24 iterations
for any hole where Jacobi's needed 50-690 (a hole d px across costs Jacobi-CG ∝ d iterations); it changes the
number of iterations, not the solution (``preconditioner="jacobi"`` gives the same pixels within the stopping
rule). Why CG and not a direct solve: the operator never has to be assembled, every image, channel and step of a
chunk is one tensor program on the GPU, and the error is controlled by the stopping rule (tests: equal to scipy's
``spsolve`` of the same system to 1e-4 and better, also for masks touching the border).

**Units and noise.** Linear imputation commutes with the per-channel affine normalisation (the weights of every
equation sum to d_i), so imputing normalised images equals the authors' imputation in [0, 1] pixel space followed
by normalisation. The noise is added after the solve to the removed pixels only: N(0, σ_c²) with σ in the
images' units, a scalar or one per channel; for the authors' σ = 0.01 in [0, 1] *pixel* units on normalised
images pass :func:`noise_for` (0.01 / std per channel), as jobs.evaluate does (pytorch-grad-cam adds 0.01 in
normalised units instead). **Noise seed:** the noise of row r at step s
of order o comes from its own CPU ``torch.Generator`` seeded with ``crc32(f"{seeds[r]}:{o}:{s}")`` and is moved to
the images' device, so it is the same on every device, in every batch composition and chunk size, and a
resumed run redraws exactly the same noise (the job passes ``seeds`` = crc32 of the sample key). The price:
one CPU draw of C·H·W normals per imputed image (~1 ms at 224 px), which on a GPU can cost about as much as the
solve.

**Curves** (:func:`road_curves`): orders "morf" (most relevant pixels removed first) and "lerf" (least relevant
first; ``lerf_by_abs`` ranks by |map| as in TR-GBP App. D) with pixel rankings and counting from
``perturbation.pixel_order`` (stable, ties by lower flat index — the authors break ties with 1e-4 random noise
on the map instead) and k = round(f·H·W) removed pixels at fraction f, default f = 0.1 … 0.9 (the authors'
percentages). In both orders f is the share of pixels *removed* (the authors' LeRF code removes 1 − f instead;
over the symmetric default fractions the AUC is the same). Per step: the target's logit, softmax probability
and top-1 hit = argmax is the target (accuracy = mean hit over images), and their normalised AUCs
(``perturbation.curve_auc``). The authors score the probability of the class the map explains (as here) and
count accuracy against the true label: the same here when the maps explain the label (``--targets label``).
"""
from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from attribution.errors import AttributionError
from attribution.metrics.perturbation import _pixel_counts, _positions, curve_auc, pixel_order
from attribution.metrics.road_solver import PRECONDITIONERS, ImputationInfo, neighbour_sum, solve

ORDERS = ("morf", "lerf")
DEFAULT_FRACTIONS = tuple(i / 10 for i in range(1, 10))
PIXEL_NOISE = 0.01  # the authors' σ in [0, 1] pixel units
DEFAULT_TOL = 1e-8  # max |residual|; measured error vs spsolve <= ~100x this on a 224-px hole (1e-6)
FLOAT32_TOL = 1e-6  # the float32 solve's default: its true residual ends near rounding, ~0.5-3e-6
SOLVE_DTYPES = {"float64": torch.float64, "float32": torch.float32}
DEFAULT_MAX_ITER = 5000


def _check(images: Tensor, removed: Tensor) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        raise AttributionError("images must be a float tensor [N, C, H, W], got "
                               f"{tuple(getattr(images, 'shape', ())) or type(images).__name__}")
    n, _, h, w = images.shape
    if not isinstance(removed, Tensor) or tuple(removed.shape) != (n, h, w):
        raise AttributionError(f"removed must be a bool tensor [{n}, {h}, {w}] for images {tuple(images.shape)}, "
                               f"got {tuple(getattr(removed, 'shape', ())) or type(removed).__name__}")
    if n and bool(removed.reshape(n, -1).all(dim=1).any()):
        bad = int(removed.reshape(n, -1).all(dim=1).nonzero()[0])
        raise AttributionError(f"image {bad}: every pixel is removed; linear imputation needs at least one kept "
                               "pixel (the system is singular)")


def linear_imputation(images: Tensor, removed: Tensor, *, noise: float | Sequence[float] | Tensor = 0.0,
                      seeds: Sequence[int] | Tensor | None = None, tol: float | None = None,
                      max_iter: int = DEFAULT_MAX_ITER, dtype: torch.dtype = torch.float64,
                      preconditioner: str = "multigrid",
                      return_info: bool = False) -> Tensor | tuple[Tensor, ImputationInfo]:
    """ROAD's noisy linear imputation of a batch: every removed pixel (all channels) becomes the weighted mean of
    its 8 neighbours (1/6 sides, 1/12 diagonals, jointly solved; see the module docstring for the system and the
    boundary), plus N(0, noise²) on the removed pixels.

    ``images``: float [N, C, H, W] (any units: normalised or [0, 1]); ``removed``: bool [N, H, W], True = removed
    (at least one pixel of each image kept). ``noise``: σ in the images' units, scalar or [C]; ``seeds``: one int
    per image (default 0, 1, …), each image's noise from ``torch.Generator().manual_seed(seed)`` on the CPU
    (device-independent). ``tol``: max |residual| per equation at which a system stops (images' units; default
    DEFAULT_TOL = 1e-8 in float64, FLOAT32_TOL = 1e-6 in float32); ``max_iter``: CG iteration cap; ``dtype``: the
    solve's precision — float64 (default) or float32, 2-4x faster on a CPU (and on GPUs with slow float64 far
    more), whose true residual ends near rounding (~0.5-3e-6), so its imputed pixels differ from the exact
    solution by up to ~1e-3 in normalised units (~2e-4 in [0, 1] pixel units) on the hardest cases measured,
    224-px holes (MoRF 90 % of a smooth map), with either preconditioner: >= ~45x below ROAD's noise;
    ``preconditioner``: "multigrid"
    (default) or "jacobi" (the earlier solver; same solution, 10-40x the iterations). Returns [N, C, H, W]
    in the images' dtype and device (kept pixels bit-identical), and with ``return_info`` also an
    :class:`ImputationInfo`."""
    _check(images, removed)
    if preconditioner not in PRECONDITIONERS:
        raise AttributionError(f"preconditioner must be one of {PRECONDITIONERS}, got {preconditioner!r}")
    n, c, h, w = images.shape
    if tol is None:
        tol = FLOAT32_TOL if dtype == torch.float32 else DEFAULT_TOL
    solved, info = solve(images.to(dtype), removed.to(images.device)[:, None].bool(), tol, max_iter,
                         preconditioner)
    out = solved.to(images.dtype)
    sigma = torch.as_tensor(noise, dtype=torch.float32)
    if sigma.ndim not in (0, 1) or (sigma.ndim == 1 and sigma.shape[0] != c):
        raise AttributionError(f"noise must be a scalar or [{c}], got shape {tuple(sigma.shape)}")
    if bool((sigma != 0).any()) and n:
        seeds = list(range(n)) if seeds is None else [int(s) for s in torch.as_tensor(seeds).reshape(-1).tolist()]
        if len(seeds) != n:
            raise AttributionError(f"{len(seeds)} seeds for {n} images")
        draws = torch.stack([torch.randn(c, h, w, generator=torch.Generator().manual_seed(s)) for s in seeds])
        scale = sigma.view(1, -1, 1, 1) if sigma.ndim else sigma
        fill = (draws * scale).to(device=images.device, dtype=images.dtype)
        out = torch.where(removed.to(images.device)[:, None].bool(), out + fill, out)
    return (out, info) if return_info else out


def step_seed(seed: int, order: str, step: int) -> int:
    """The noise seed of one (row seed, order, step index): crc32 of ``f"{seed}:{order}:{step}"``."""
    return zlib.crc32(f"{int(seed)}:{order}:{int(step)}".encode())


def noise_for(preprocessing: object | None, pixel_noise: float = PIXEL_NOISE) -> Tensor | float:
    """σ in normalised units for σ = ``pixel_noise`` in [0, 1] pixel units: pixel_noise / std per channel
    (float32 [C]); ``preprocessing`` None: the scalar itself (images already in pixel units)."""
    if preprocessing is None:
        return float(pixel_noise)
    try:
        std = torch.as_tensor(preprocessing.std, dtype=torch.float32)
    except AttributeError as exc:
        raise AttributionError(f"noise_for: {type(preprocessing).__name__} has no std") from exc
    return pixel_noise / std


def road_curves(model: Callable[[Tensor], Tensor], images: Tensor, maps: Tensor, targets: Tensor,
                fractions: Sequence[float] = DEFAULT_FRACTIONS, *, orders: Sequence[str] = ORDERS,
                lerf_by_abs: bool | Tensor = False, noise: float | Sequence[float] | Tensor = PIXEL_NOISE,
                seeds: Sequence[int] | Tensor | None = None, chunk_size: int = 64, tol: float | None = None,
                max_iter: int = DEFAULT_MAX_ITER, dtype: torch.dtype = torch.float64,
                preconditioner: str = "multigrid") -> dict:
    """ROAD MoRF / LeRF curves: remove the first k = round(f·H·W) pixels of each ranking at every fraction f,
    impute them (:func:`linear_imputation`, noisy), and score the model on the imputed images.

    ``model``: normalised images [B, C, H, W] -> logits [B, K] (called under inference mode); ``images``: [N, C, H,
    W] in the model's input units; ``maps``: [N, H, W]; ``targets``: [N] class per image (the map's class);
    ``fractions``: S values in [0, 1) (default 0.1 … 0.9); ``orders``: subset of ("morf", "lerf");
    ``lerf_by_abs``: bool or bool [N]; ``noise``: σ in the images' units (scalar or [C]; for the authors'
    σ = 0.01 in pixel units on normalised images pass :func:`noise_for` (preprocessing)); ``seeds``: [N] ints, one
    per image (default 0 … N-1; the noise of (row, order, step) uses :func:`step_seed`); ``chunk_size``: imputed
    images per solve and per forward pass (results do not depend on it beyond the solver tolerance and float
    rounding of batched kernels); ``tol``/``max_iter``/``dtype``/``preconditioner``: the solver's
    (:func:`linear_imputation`).

    Returns {order: {"logit", "prob", "top1": float32 [N, S]; "prob_auc", "top1_auc": float64 [N]}} for each
    order, plus "fractions" (float64 [S]) and "solver" (an :class:`ImputationInfo` over all chunks: the most
    iterations, the largest residual, whether all converged)."""
    if not isinstance(images, Tensor) or images.ndim != 4:
        raise AttributionError("images must be a tensor [N, C, H, W], got "
                               f"{tuple(getattr(images, 'shape', ())) or type(images).__name__}")
    if not isinstance(maps, Tensor) or maps.ndim != 3 or maps.shape[0] != images.shape[0] \
            or maps.shape[1:] != images.shape[2:]:
        raise AttributionError(f"maps {tuple(getattr(maps, 'shape', ()))} must be [N, H, W] for images "
                               f"{tuple(images.shape)}")
    bad = [o for o in orders if o not in ORDERS]
    if bad or not orders:
        raise AttributionError(f"orders must be a non-empty subset of {ORDERS}, got {list(orders)}")
    if chunk_size < 1:
        raise AttributionError(f"chunk_size must be >= 1, got {chunk_size}")
    n, _, h, w = images.shape
    device = images.device
    counts = _pixel_counts(fractions, h * w)
    if any(k >= h * w for k in counts):
        raise AttributionError(f"fractions {list(fractions)}: a step would remove every pixel of {h}x{w}; "
                               "ROAD needs at least one kept pixel (use fractions < 1)")
    targets = torch.as_tensor(targets, device=device).long().reshape(-1)
    if targets.shape[0] != n:
        raise AttributionError(f"{targets.shape[0]} targets for {n} images")
    seeds = torch.arange(n) if seeds is None else torch.as_tensor(seeds).reshape(-1).long().cpu()
    if seeds.shape[0] != n:
        raise AttributionError(f"{seeds.shape[0]} seeds for {n} images")
    maps = maps.to(device)
    by_abs = torch.as_tensor(lerf_by_abs, device=device, dtype=torch.bool).expand(n)
    steps = len(counts)
    count_t = torch.tensor(counts, device=device, dtype=torch.long)
    out: dict = {"fractions": torch.tensor([float(f) for f in fractions], dtype=torch.float64)}
    worst = ImputationInfo(0, 0.0, True)
    for order_name in orders:
        order = pixel_order(maps, most_relevant_first=(order_name == "morf"))
        if order_name == "lerf" and bool(by_abs.any()):
            order = torch.where(by_abs[:, None], pixel_order(maps, most_relevant_first=False, by_abs=True), order)
        position = _positions(order, h * w)
        curves = {name: torch.empty(n, steps, device=device) for name in ("logit", "prob", "top1")}
        total = n * steps
        with torch.inference_mode():
            for start in range(0, total, chunk_size):
                pair = torch.arange(start, min(start + chunk_size, total), device=device)
                r, s = pair // steps, pair % steps
                removed = (position[r] < count_t[s][:, None]).view(-1, h, w)
                pair_seeds = [step_seed(int(seeds[a]), order_name, int(b)) for a, b in zip(r.tolist(), s.tolist())]
                batch, info = linear_imputation(images[r], removed, noise=noise, seeds=pair_seeds, tol=tol,
                                                max_iter=max_iter, dtype=dtype, preconditioner=preconditioner,
                                                return_info=True)
                worst = ImputationInfo(max(worst.iterations, info.iterations),
                                       max(worst.max_residual, info.max_residual), worst.converged and info.converged)
                logits = model(batch)
                if not isinstance(logits, Tensor) or logits.ndim != 2:
                    raise AttributionError("the model must return logits [B, classes], got "
                                           f"{tuple(getattr(logits, 'shape', ())) or type(logits).__name__}")
                if start == 0 and (int(targets.max()) >= logits.shape[1] or int(targets.min()) < 0):
                    raise AttributionError(f"a target is outside the model's {logits.shape[1]} classes")
                t = targets[r][:, None]
                logits = logits.float()
                curves["logit"][r, s] = logits.gather(1, t)[:, 0]
                curves["prob"][r, s] = logits.softmax(dim=1).gather(1, t)[:, 0]
                curves["top1"][r, s] = (logits.argmax(dim=1, keepdim=True) == t).float()[:, 0]
        curves["prob_auc"] = curve_auc(curves["prob"], fractions)
        curves["top1_auc"] = curve_auc(curves["top1"], fractions)
        out[order_name] = curves
    out["solver"] = worst
    return out


__all__ = ["DEFAULT_FRACTIONS", "ImputationInfo", "ORDERS", "PIXEL_NOISE", "linear_imputation", "neighbour_sum",
           "noise_for", "road_curves", "step_seed"]
