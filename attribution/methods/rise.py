"""RISE: Randomized Input Sampling for Explanation (Petsiuk, Das & Saenko, BMVC 2018).

    map_c = Σ_i p_c(x ⊙ M_i) · M_i / (N · p)

Masks as in the authors' code (eclique/RISE ``generate_masks``): a binary grid of ``cells``×``cells`` cells,
each 1 with probability ``p``; bilinearly upsampled to (cells + 1)·⌈H / cells⌉ pixels per side; cropped to H×W at a
random shift in [0, ⌈H / cells⌉) × [0, ⌈W / cells⌉). Defaults are the paper's: N = 4000 masks, cells = 7,
p = 0.5.

Decisions:

* Random numbers come from one CPU ``torch.Generator`` seeded by ``seed`` (grids first, then shifts), so the
  same seed gives bit-identical masks on every device and batch layout; the sequence is not the authors'
  NumPy one. Upsampling is ``F.interpolate(bilinear, align_corners=False)``, which replicates the edge where
  the authors' ``skimage.transform.resize(order=1, mode="reflect")`` reflects: the two differ only in the outer
  half cell of the upsampled grid.
* "Masked out" means the *reference* image — black in pixel space by default, then normalised
  (:func:`attribution.methods.a_fmi.reference_images`; "white", "random" or a tensor also work):
  x_i = M_i·x + (1 − M_i)·reference. The authors multiply the normalised tensor by the mask (i.e. towards the
  dataset mean colour).
* p_c is the softmax probability of the target class (the authors wrap the model in a Softmax);
  ``probabilities=False`` uses the logit instead.
* Batched: each forward pass runs up to ``batch_size`` masked images (a chunk of masks × all B images); the
  scores of all targets come from the same passes. Masks are generated chunk by chunk, never all at once.
  Same seed and same ``batch_size`` → bit-identical maps.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from attribution.errors import AttributionError
from attribution.methods.a_fmi import reference_images
from attribution.methods.base import Attribution, Method, check_target_range


def _draw(n: int, cells: int, p: float, size: tuple[int, int], seed: int) -> tuple[Tensor, Tensor, tuple[int, int]]:
    """Grids [N, cells, cells] (float 0/1), shifts [N, 2] and the cell size, from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    grids = (torch.rand(n, cells, cells, generator=g) < p).float()
    cell = (math.ceil(size[0] / cells), math.ceil(size[1] / cells))
    shifts = torch.stack([torch.randint(0, cell[0], (n,), generator=g),
                          torch.randint(0, cell[1], (n,), generator=g)], dim=1)
    return grids, shifts, cell


def _render(grids: Tensor, shifts: Tensor, cell: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Upsample grids [n, s, s] to (s+1)·cell and crop H×W at the shifts: masks [n, H, W]."""
    s = grids.shape[-1]
    up = F.interpolate(grids[:, None], size=((s + 1) * cell[0], (s + 1) * cell[1]), mode="bilinear",
                       align_corners=False)[:, 0]
    return torch.stack([m[int(dy):int(dy) + size[0], int(dx):int(dx) + size[1]] for m, (dy, dx) in zip(up, shifts)])


def rise_masks(n: int, size: tuple[int, int], *, cells: int = 7, p: float = 0.5, seed: int = 0) -> Tensor:
    """The ``n`` masks [n, H, W] (float32 in [0, 1], CPU) that :class:`RISE` uses for ``seed``."""
    grids, shifts, cell = _draw(n, cells, p, size, seed)
    return _render(grids, shifts, cell, size)


class RISE(Method):
    """RISE maps [B(, T), H, W]; see the module docstring. Options: ``masks`` (N, 4000), ``cells`` (7), ``p``
    (0.5), ``seed`` (0), ``batch_size`` (masked images per forward pass, 64), ``reference`` ("black"; see
    :func:`reference_images`), ``probabilities`` (True: softmax p_c; False: logits)."""

    name = "rise"

    def _attribute(self, images: Tensor, targets: Tensor, *, masks: int = 4000, cells: int = 7, p: float = 0.5,
                   seed: int = 0, batch_size: int = 64, reference: str | Tensor = "black",
                   probabilities: bool = True) -> Attribution:
        if masks < 1 or cells < 1 or not 0 < p <= 1 or batch_size < 1:
            raise AttributionError(f"rise: need masks >= 1, cells >= 1, 0 < p <= 1, batch_size >= 1; got "
                                   f"masks={masks}, cells={cells}, p={p}, batch_size={batch_size}")
        b, (h, w) = images.shape[0], images.shape[-2:]
        ref = reference_images(self.spec, reference, images, seed)
        images = images.detach()
        delta = images - ref
        grids, shifts, cell = _draw(masks, cells, p, (h, w), seed)
        per_pass = max(1, batch_size // b)
        saliency = images.new_zeros(b, targets.shape[1], h, w)
        with torch.no_grad():
            for start in range(0, masks, per_pass):
                m = _render(grids[start:start + per_pass], shifts[start:start + per_pass], cell, (h, w))
                m = m.to(images.device, images.dtype)
                n = m.shape[0]
                batch = (m[:, None, None] * delta[None] + ref[None]).reshape(n * b, *images.shape[1:])
                logits = self.spec.module(batch)
                if start == 0:
                    check_target_range(targets, logits.shape[1], self.name)
                scores = logits.softmax(dim=1) if probabilities else logits
                scores = scores.view(n, b, -1).gather(2, targets[None].expand(n, -1, -1))  # [n, B, T]
                saliency += torch.einsum("nbt,nhw->bthw", scores.to(images.dtype), m)
        return Attribution(saliency / (masks * p))
