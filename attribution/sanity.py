"""Model-parameter randomisation test (Adebayo et al. 2018; TR-GBP §5.2.2, App. B, Fig. 5/9/10), pure torch.

Cascading randomisation: starting from the output, one block after another is re-initialised (step k = the top
k blocks randomised, cumulative), the maps of each method are recomputed for the *same* (image, target) pairs
(targets fixed to the original model's choice), and each map is compared with the original model's map. A method
that explains the model loses similarity as more of the model is destroyed; an "edge detector" keeps it.

Decisions where the papers are open:

* **Blocks, top-down** (:func:`randomisation_blocks`), chosen by the module's type, not its name:
  torchvision ResNets: ``fc, layer4, layer3, layer2, layer1, conv1`` (conv1 with bn1: the stem), as TR-GBP
  Fig. 5/10. torchvision VGGs: the whole ``classifier`` (its three Linear layers) as ONE step, as TR-GBP Fig. 9
  ("raw, classifier, layer 11, …"), then the conv blocks between max-pools top-down, ``block5`` … ``block1``
  (block b = the convs (+BN) after the (b-1)-th max-pool). EfficientNet-Lite0: ``classifier`` (_fc), ``head``
  (_conv_head + _bn1), the 7 stages ``stage7`` … ``stage1`` (MBConv blocks grouped 1,2,2,3,3,4,1), ``stem``
  (_conv_stem + _bn0). The benchmark's small CNNs (attribution/architectures/small_cnn.py): ``bench_resnet``
  ``fc, layer3, layer2, layer1, stem``; ``bench_vgg`` (and ``bench_vgg_plain``) ``classifier`` (its 3 Linear layers, one step), then
  ``block4`` … ``block1``. Any other model (e.g. a ``models.wrap``-ped CNN): its top-level children
  that hold parameters, in reverse registration order, named by their attribute names; when only one child
  holds parameters the rule descends into it (so ``wrap(nn.Sequential(body))`` still gives several blocks).
  Parameters registered directly on a module whose children are split up are not randomised.
* **Re-initialisation** (:func:`randomised_copy`): every parameter tensor of a randomised block is replaced by
  normal draws: conv and linear *kernels* (tensors of 2 or more dimensions) from N(0, their own std), as a fresh
  initialisation of trained scale would; *vectors* (conv/linear biases, BatchNorm weight and bias) from N(their own
  mean, their own std), so effective biases stay trained-like and non-zero — TR-GBP attributes to biases, and a
  ``reset_parameters()`` (BatchNorm bias 0, weight 1) would make its change trivial. Kernels are centred because
  a kernel redrawn around a non-zero trained mean acting on non-negative (post-ReLU) inputs shifts every unit by
  mean x (sum of its inputs): on the benchmark's VGG-style head that killed every ReLU after the classifier step
  and made every guided map all-zero. A tensor with one element or zero spread (e.g. an all-zero bias) keeps its value. BatchNorm running
  statistics (buffers) are kept. Draws (float32; float64 for float64 parameters) come from a CPU generator
  seeded by (seed, block position from the top), so step k's copy is the same on every device and its top k-1
  blocks equal step k-1's.
* **Similarity** (:func:`similarity_to_original`), via ``attribution.metrics.similarity``: Spearman rank
  correlation of the map and of |map| with the original's, and SSIM of the min-max normalised maps
  (``ssim(minmax(a), minmax(b), data_range=1)``, skimage's 7x7 window). Step 0 compares the original with itself
  (1 where defined). A constant map has no rank correlation: NaN.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torchvision
from torch import Tensor, nn

from attribution.architectures.efficientnet_lite import LITE0_STAGES, EfficientNetLite0
from attribution.errors import AttributionError
from attribution.metrics.similarity import minmax, spearman, ssim
from attribution.models import ModelSpec

Block = tuple[str, list[nn.Module]]
ORIGINAL = "original"
SIMILARITIES = ("spearman", "spearman_abs", "ssim")


def randomisation_blocks(spec: ModelSpec) -> list[Block]:
    """The blocks of ``spec.module`` in randomisation order, from the TOP (output) down: [(name, modules)].

    See the module docstring for the rule per architecture. The modules are ``spec.module``'s own submodules.
    Raises AttributionError for a model without parameters.
    """
    module = spec.module
    if isinstance(module, torchvision.models.ResNet):
        blocks = [("fc", [module.fc])] + [(f"layer{i}", [getattr(module, f"layer{i}")]) for i in (4, 3, 2, 1)]
        blocks.append(("conv1", [module.conv1, module.bn1]))
    elif isinstance(module, torchvision.models.VGG):
        blocks = [("classifier", [module.classifier])] + _vgg_feature_blocks(module.features)
    elif _bench(module) == "bench_resnet":
        blocks = [("fc", [module.head.fc])] + [(name, [child]) for name, child in
                                               reversed(list(module.features.named_children()))]
    elif _bench(module) in ("bench_vgg", "bench_vgg_plain"):
        blocks = [("classifier", [module.head])] + _vgg_feature_blocks(module.features)
    elif isinstance(module, EfficientNetLite0):
        blocks = [("classifier", [module._fc]), ("head", [module._conv_head, module._bn1])]
        stages, start = [], 0
        for number, (*_, repeats) in enumerate(LITE0_STAGES, start=1):
            stages.append((f"stage{number}", list(module._blocks[start:start + repeats])))
            start += repeats
        blocks += stages[::-1] + [("stem", [module._conv_stem, module._bn0])]
    else:
        blocks = _generic_blocks(module)
    blocks = [(name, mods) for name, mods in blocks if _parameters(mods)]
    if not blocks:
        raise AttributionError(f"model {spec.name} has no parameters to randomise")
    return blocks


def _bench(module: nn.Module) -> str | None:
    """``bench_resnet``/``bench_vgg`` for the benchmark's SmallCNN (recognised by its ``arch``, ``features`` and
    ``head``, so this module does not depend on that one), else None."""
    arch = getattr(module, "arch", None)
    parts = all(isinstance(getattr(module, n, None), nn.Sequential) for n in ("features", "head"))
    return arch if parts and arch in ("bench_resnet", "bench_vgg", "bench_vgg_plain") else None


def _vgg_feature_blocks(features: nn.Sequential) -> list[Block]:
    groups: list[list[nn.Module]] = [[]]
    for layer in features:
        if isinstance(layer, nn.MaxPool2d):
            groups.append([])
        else:
            groups[-1].append(layer)
    groups = [g for g in groups if _parameters(g)]
    return [(f"block{b}", groups[b - 1]) for b in range(len(groups), 0, -1)]


def _generic_blocks(module: nn.Module) -> list[Block]:
    prefix = ""
    while True:
        children = [(name, child) for name, child in module.named_children() if _parameters([child])]
        if len(children) != 1:
            break
        name, module = children[0]
        prefix += name + "."
    return [(prefix + name, [child]) for name, child in reversed(children)]


def _parameters(modules: Sequence[nn.Module]) -> list[nn.Parameter]:
    seen: set[int] = set()
    params = []
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def _block_seed(seed: int, position: int) -> int:
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, position]).generate_state(1)[0])


@torch.no_grad()
def _reinitialise(modules: Sequence[nn.Module], seed: int, position: int) -> None:
    """Redraw every parameter of ``modules``: kernels from N(0, their std), vectors from N(their mean, their std)
    (in place, on a private copy only)."""
    generator = torch.Generator().manual_seed(_block_seed(seed, position))
    for p in _parameters(modules):
        values = p.detach().to(torch.float64)  # statistics in float64, on the parameter's device
        std = float(values.std()) if values.numel() > 1 else 0.0
        std = std if np.isfinite(std) else 0.0
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        mean = float(values.mean()) if p.ndim < 2 else 0.0  # kernels centred, vectors keep their mean
        draw = torch.randn(p.shape, generator=generator, dtype=dtype).mul_(std).add_(mean)
        p.copy_(draw.to(device=p.device, dtype=p.dtype))


def _copy(spec: ModelSpec) -> ModelSpec:
    """A deep copy whose target_layer/features/head are the copied module's own submodules: one deepcopy of the
    whole spec, whose memo maps every submodule shared between the fields to the same copy."""
    return copy.deepcopy(spec)


def randomised_copy(spec: ModelSpec, steps: int, *, seed: int) -> ModelSpec:
    """A deep copy of ``spec`` whose top ``steps`` blocks (:func:`randomisation_blocks`) are re-initialised.

    ``steps``: 0 … number of blocks (0 = an unchanged copy). The caller's model is never modified. Same
    ``(spec, steps, seed)`` -> bit-identical weights, on any device. The copy keeps the original's device, dtype
    and train/eval mode; its target_layer/features/head point into the copy.
    """
    blocks = randomisation_blocks(spec)
    if not 0 <= int(steps) <= len(blocks):
        raise AttributionError(f"randomised_copy: steps must be in 0..{len(blocks)} for model {spec.name} "
                               f"({', '.join(n for n, _ in blocks)}), got {steps}")
    twin = _copy(spec)
    for position, (_, modules) in enumerate(randomisation_blocks(twin)[:int(steps)]):
        _reinitialise(modules, seed, position)
    return twin


def cascading_maps(spec: ModelSpec, images: Tensor, targets: Tensor, methods: Sequence[str], *,
                   options: Mapping[str, Mapping] | None = None, seed: int = 0,
                   steps: int | None = None) -> tuple[list[str], Tensor]:
    """Maps of every method after every cascading-randomisation step.

    ``images``: normalised float [B, C, H, W] on the model's device; ``targets``: LongTensor [B], the classes to
    explain at every step (pass the ORIGINAL model's choice, e.g. its top-1); ``methods``: registry names;
    ``options``: {method: its keyword options}; ``steps``: randomise only the top ``steps`` blocks (default all).
    Returns (names, maps): ``names[0] == "original"``, ``names[k]`` the block randomised at step k (cumulative
    from the top); ``maps`` float32 [S+1, M, B, H, W] in each method's own units, on the images' device.
    Step k's model equals ``randomised_copy(spec, k, seed=seed)``; the caller's model is never modified.
    """
    from attribution.methods import attribute, get_method

    options = dict(options or {})
    for method in methods:
        get_method(method)
    unknown = sorted(set(options) - set(methods))
    if unknown:
        raise AttributionError(f"cascading_maps: options given for {unknown[0]!r}, which is not among the methods")
    if not isinstance(targets, Tensor) or targets.ndim != 1:
        raise AttributionError(f"cascading_maps: targets must be a LongTensor [B], got "
                               f"{tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__}")
    blocks = randomisation_blocks(spec)
    steps = len(blocks) if steps is None else int(steps)
    if not 0 <= steps <= len(blocks):
        raise AttributionError(f"cascading_maps: steps must be in 0..{len(blocks)} for model {spec.name}, "
                               f"got {steps}")
    twin = _copy(spec)
    twin_blocks = randomisation_blocks(twin)
    per_step = []
    for k in range(steps + 1):
        if k:
            _reinitialise(twin_blocks[k - 1][1], seed, k - 1)
        per_step.append(torch.stack([attribute(m, twin, images, targets, **dict(options.get(m, {})))
                                     for m in methods]))
    return [ORIGINAL] + [name for name, _ in blocks[:steps]], torch.stack(per_step)


def similarity_to_original(maps: Tensor) -> dict[str, Tensor]:
    """Similarity of each step's maps to step 0's: {"spearman", "spearman_abs", "ssim"} -> float64 [S+1, M, B].

    ``maps``: [S+1, M, B, H, W] as :func:`cascading_maps` returns (any float dtype and device). Spearman of the
    maps and of |maps| (NaN for a constant map), SSIM of the min-max normalised maps with data_range 1.
    """
    if not isinstance(maps, Tensor) or maps.ndim != 5:
        raise AttributionError(f"similarity_to_original: maps must be [S+1, M, B, H, W], got "
                               f"{tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__}")
    s1, m, b, h, w = maps.shape
    current = maps.reshape(s1 * m * b, h, w)
    original = maps[:1].expand(s1, m, b, h, w).reshape(s1 * m * b, h, w)
    flat_c, flat_o = current.reshape(-1, h * w), original.reshape(-1, h * w)
    out = {"spearman": spearman(flat_c, flat_o), "spearman_abs": spearman(flat_c.abs(), flat_o.abs()),
           "ssim": ssim(minmax(current), minmax(original), data_range=1.0)}
    return {k: v.reshape(s1, m, b) for k, v in out.items()}


__all__ = ["ORIGINAL", "SIMILARITIES", "cascading_maps", "randomisation_blocks", "randomised_copy",
           "similarity_to_original"]
