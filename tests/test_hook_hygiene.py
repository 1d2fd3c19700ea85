"""No trace on the caller's model, in the style of Captum's tests/attr/test_hook_removal.py.

For every registered method and for ResNet-18, VGG-11-BN and a small custom CNN (``wrap`` with features/head):
after ``attribute`` — whether it returned, rejected an out-of-range target after the forward pass, or was
interrupted by an exception raised inside the model's forward — no module hook of any kind remains (also on the
``features``/``head`` containers of the spec), the global hook dicts are unchanged, the state dict is bitwise
identical, the outputs on a fixed input are bitwise identical, and no training/inplace/requires_grad flag,
parameter ``.grad`` or module attribute has changed. The caller's images are not modified either.
"""
from __future__ import annotations

import copy
import gc
import types
import warnings
from enum import Enum

import pytest
import torch
import torch.nn.modules.module as module_mod
from torch import nn

from attribution import models
from attribution.errors import AttributionError
from attribution.methods import REGISTRY, attribute

METHODS = sorted(REGISTRY)

MODELS = ("resnet18", "vgg11_bn", "custom")
# every per-module hook dict torch keeps; the first four are the ones Captum's test checks
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")
SIZE = 64  # torchvision ResNets/VGGs accept any size >= 32 (adaptive pooling); small keeps the file fast
# Small settings for the iterative methods: hygiene does not depend on how long they iterate.
FAST = {"rise": {"masks": 8, "batch_size": 8}, "extremal_perturbation": {"iterations": 2},
        "cameras": {"resolutions": [SIZE, SIZE + 32]}, "gig": {"steps": 4}, "ig": {"steps": 4},
        "smoothgrad": {"samples": 2}, "vargrad": {"samples": 2}, "xrai": {"base": "saliency"}}


def fast(method: str) -> dict:
    """Options that keep ``method`` quick in these tests (only those it accepts)."""
    return dict(FAST.get(method, {}))


class HookRemovalMode(Enum):
    """``normal``: the call returns. ``incorrect_target``: a target >= num_classes, rejected (AttributionError)
    after the forward pass. ``invalid_module``: a module raises RuntimeError inside the forward pass, either in
    the middle of the feature extractor (``invalid_module_mid``) or in the classifier head, after every
    activation has run (``invalid_module_head``)."""

    normal = 1
    incorrect_target = 2
    invalid_module_mid = 3
    invalid_module_head = 4


class Tripwire(nn.Module):
    """Identity, or raises RuntimeError while ``armed``."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.armed:
            raise RuntimeError("tripwire: raised on purpose inside the forward pass")
        return x


class ResBlock(nn.Module):
    """torchvision-style block: one in-place ReLU module called twice, in-place skip addition."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class TinyNet(nn.Module):
    """A custom CNN: features -> head, with in-place ReLU/ReLU6, a reused ReLU, BatchNorm and two tripwires."""

    def __init__(self, num_classes: int = 10, activation: type[nn.Module] = nn.ReLU6) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            ResBlock(8), Tripwire(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), activation(),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU6(inplace=True))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(16, 32), nn.ReLU(inplace=True),
                                  Tripwire(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def tiny_spec(activation: type[nn.Module] = nn.ReLU6) -> models.ModelSpec:
    torch.manual_seed(0)
    net = TinyNet(activation=activation)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    net.eval()
    net.head[4].training = True  # a submodule left in training mode: nothing may call .eval()/.train()
    return models.wrap(net, name="tinynet", features=net.features, head=net.head)


# --------------------------------------------------------------------------------------------------- snapshot


def all_modules(spec: models.ModelSpec) -> dict[str, nn.Module]:
    """Every module reachable from the spec (the model, and the features/head/target-layer views of it)."""
    found: dict[int, tuple[str, nn.Module]] = {}
    for root_name, root in (("module", spec.module), ("features", spec.features), ("head", spec.head),
                            ("target_layer", spec.target_layer)):
        if root is None:
            continue
        for name, m in root.named_modules():
            found.setdefault(id(m), (f"{root_name}.{name}" if name else root_name, m))
    return {name: m for name, m in found.values()}


def global_hooks() -> dict[str, list]:
    return {name: list(getattr(module_mod, name).items()) for name in sorted(dir(module_mod))
            if name.startswith("_global_") and isinstance(getattr(module_mod, name), dict)}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def snapshot(spec: models.ModelSpec, x: torch.Tensor, with_state: bool = True) -> dict:
    mods = all_modules(spec)
    with torch.no_grad():
        output = spec.module(x)
    return {
        "state": {k: (v.dtype, v.shape, bits(v).clone()) for k, v in spec.module.state_dict().items()}
        if with_state else None,
        "output": output,
        "training": {n: m.training for n, m in mods.items()},
        "inplace": {n: m.inplace for n, m in mods.items() if hasattr(m, "inplace")},
        "attributes": {n: sorted(vars(m)) for n, m in mods.items()},
        "children": {n: [(k, id(c)) for k, c in m.named_children()] for n, m in mods.items()},
        "params": {n: (id(p), p.requires_grad, p.grad is None) for n, p in spec.module.named_parameters()},
        "globals": global_hooks(),
    }


def assert_no_hooks(spec: models.ModelSpec) -> None:
    for name, m in all_modules(spec).items():
        for attr in HOOK_DICTS:
            hooks = getattr(m, attr, {})
            assert len(hooks) == 0, f"{len(hooks)} hook(s) left in {name}.{attr}: {list(hooks.values())}"
        assert getattr(m, "_is_full_backward_hook", None) is None, f"{name}: backward hook mode left set"


def assert_untouched(spec: models.ModelSpec, x: torch.Tensor, before: dict) -> None:
    assert_no_hooks(spec)
    after = snapshot(spec, x, with_state=False)
    assert after["globals"] == before["globals"], "global module hooks changed"
    state = spec.module.state_dict()
    assert state.keys() == before["state"].keys(), "state dict keys changed"
    for key, (dtype, shape, raw) in before["state"].items():
        v = state[key]
        assert (v.dtype, v.shape) == (dtype, shape) and torch.equal(bits(v), raw), f"state_dict[{key!r}] changed"
    assert torch.equal(bits(after["output"]), bits(before["output"])), "model output on the fixed input changed"
    for field in ("training", "inplace", "attributes", "children", "params"):
        changed = {k: (before[field].get(k), v) for k, v in after[field].items() if before[field].get(k) != v}
        assert after[field].keys() == before[field].keys() and not changed, f"{field} changed: {changed}"


# --------------------------------------------------------------------------------------------------- fixtures


def _arm_on_demand(module: nn.Module) -> None:
    """Give a torchvision module (in a private copy) a tripwire: its forward raises while ``module.armed``."""
    original = module.forward

    def forward(self, *args, **kwargs):
        if self.armed:
            raise RuntimeError("tripwire: raised on purpose inside the forward pass")
        return original(*args, **kwargs)

    module.armed = False
    module.forward = types.MethodType(forward, module)


class Subject(types.SimpleNamespace):
    spec: models.ModelSpec
    images: torch.Tensor
    targets: torch.Tensor
    num_classes: int
    tripwires: dict  # location ("mid"/"head") -> module with an ``armed`` flag
    before: dict


@pytest.fixture(scope="module")
def subjects(request):
    """Per model name: the shared fixture spec (normal/target modes) and a private copy with tripwires."""
    cache: dict[tuple[str, bool], Subject] = {}

    def get(name: str, with_tripwires: bool) -> Subject:
        key = (name, with_tripwires)
        if key in cache:
            return cache[key]
        if name == "custom":
            spec = tiny_spec()
            tripwires = {"mid": spec.module.features[5], "head": spec.module.head[4]}
        else:
            spec = request.getfixturevalue(name)
            if with_tripwires:
                spec = copy.deepcopy(spec)  # memo keeps target_layer/features/head pointing into the copy
                m = spec.module
                if name == "resnet18":  # the reused in-place ReLU of a block (its forward pre-hook has run)
                    tripwires = {"mid": m.layer2[0].relu, "head": m.fc}
                else:
                    tripwires = {"mid": m.features[10], "head": m.classifier[6]}
                for t in tripwires.values():
                    _arm_on_demand(t)
            else:
                tripwires = {}
        g = torch.Generator().manual_seed(3)
        images = torch.randn(2, 3, SIZE, SIZE, generator=g)
        num_classes = 10 if name == "custom" else 1000
        targets = torch.tensor([1, 7])
        subject = Subject(spec=spec, images=images, targets=targets, num_classes=num_classes, tripwires=tripwires,
                          before=None)
        subject.before = snapshot(spec, images)
        assert_no_hooks(spec)
        cache[key] = subject
        return subject

    return get


# --------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("mode", list(HookRemovalMode), ids=lambda m: m.name)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_hook_removal(subjects, method, model, mode):
    subject = subjects(model, with_tripwires=mode.name.startswith("invalid_module"))
    images = subject.images.clone()
    targets = subject.targets
    if mode is HookRemovalMode.normal:
        maps = attribute(method, subject.spec, images, targets, **fast(method))
        assert maps.shape == (2, SIZE, SIZE) and torch.isfinite(maps).all()
    elif mode is HookRemovalMode.incorrect_target:
        with pytest.raises(AttributionError, match="out of range"):
            attribute(method, subject.spec, images, torch.tensor([1, subject.num_classes]), **fast(method))
    else:
        tripwire = subject.tripwires["mid" if mode is HookRemovalMode.invalid_module_mid else "head"]
        tripwire.armed = True
        try:
            with pytest.raises(RuntimeError, match="tripwire"):
                attribute(method, subject.spec, images, targets, **fast(method))
        finally:
            tripwire.armed = False
    assert torch.equal(bits(images), bits(subject.images)) and not images.requires_grad and images.grad is None, \
        "the caller's images were modified"
    assert_untouched(subject.spec, subject.images, subject.before)


@pytest.mark.parametrize("method", METHODS)
def test_hook_removal_targets_per_image(subjects, method):
    """Targets [B, T] (one forward, several backward passes) leave no trace either."""
    subject = subjects("custom", with_tripwires=False)
    maps = attribute(method, subject.spec, subject.images.clone(), torch.tensor([[1, 2, 3], [9, 0, 1]]),
                     **fast(method))
    assert maps.shape == (2, 3, SIZE, SIZE)
    assert_untouched(subject.spec, subject.images, subject.before)


@pytest.mark.parametrize("method", METHODS)
def test_hook_removal_unsupported_activation(method):
    """A SiLU after some ReLUs: the guided rule (gbp, tr_gbp) refuses it while attaching its hooks, after rules
    are already on the earlier activations; the other methods (A-FMI's secant rule included) accept it."""
    spec = tiny_spec(activation=nn.SiLU)
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    before = snapshot(spec, images)
    if method in ("gbp", "tr_gbp"):
        with pytest.raises(AttributionError, match="SiLU"):
            attribute(method, spec, images, torch.tensor([1, 7]), **fast(method))
    else:
        attribute(method, spec, images, torch.tensor([1, 7]), **fast(method))
    assert_untouched(spec, images, before)


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on some of torch's lazy module objects warns
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.mark.parametrize("model", ("resnet18", "custom"))
@pytest.mark.parametrize("method", METHODS)
def test_no_tensor_outlives_a_call(subjects, method, model):
    """Nothing a call makes stays in memory after it returns (a long-running actor would otherwise grow with
    every batch): after a warm-up call, two more calls — also one that fails — leave the number of live tensors
    unchanged. Caught a real leak: TR-GBP's and FullGrad's gradient hooks held their unit's output tensor, a
    cycle through the autograd graph that Python's GC cannot see (one whole forward graph per call)."""
    subject = subjects(model, with_tripwires=False)
    options = fast(method)
    attribute(method, subject.spec, subject.images, subject.targets, **options)
    before = _live_tensors()
    for _ in range(2):
        attribute(method, subject.spec, subject.images, subject.targets, **options)
    with pytest.raises(AttributionError):
        attribute(method, subject.spec, subject.images, torch.tensor([1, subject.num_classes]), **options)
    assert _live_tensors() == before
