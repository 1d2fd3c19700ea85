"""FMI faithfulness (A-FMI §4.1): classify images by the cosine similarity of their FMI vector to class prototypes.

Protocol of the paper: "for a specific image in class c, we use the attribution scores of its feature maps
FMI^c = {FMI_1, …, FMI_K} as the refined representation of the image" — i.e. the FMI vector *for the image's
ground-truth class c* (not the predicted class); "we then average the class-specific attribution scores over all
training images" of class c to get the prototype of c; each validation image (again represented by FMI^c of its
true class c) is assigned the class of the most cosine-similar prototype, and the accuracy is the share assigned
to c. The functions below take any feature vectors; the caller passes FMI^label (jobs.evaluate uses the a_fmi
rows whose target is the label).

Details the paper leaves open (decided here): prototypes are plain means of the (un-normalised) vectors; a zero
vector has cosine similarity 0 to everything; ties between prototypes go to the lowest class index; a test label
without a training prototype counts as a miss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attribution.errors import AttributionError


def _check(features: Tensor, labels: Tensor | None, where: str) -> None:
    if not isinstance(features, Tensor) or features.ndim != 2:
        raise AttributionError(f"{where}: features must be a tensor [N, K], got "
                               f"{tuple(getattr(features, 'shape', ())) or type(features).__name__}")
    if labels is not None and (labels.ndim != 1 or labels.shape[0] != features.shape[0]):
        raise AttributionError(f"{where}: {tuple(labels.shape)} labels for {features.shape[0]} feature vectors")


def class_prototypes(features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Mean feature vector per class. ``features`` [N, K] (float), ``labels`` [N] (integer class ids) ->
    (classes: LongTensor [C], sorted distinct labels; prototypes: [C, K] in the features' float dtype, row i =
    mean of the features labelled classes[i]). Same device as ``features``."""
    labels = torch.as_tensor(labels, device=features.device if isinstance(features, Tensor) else None).long()
    _check(features, labels, "class_prototypes")
    if features.shape[0] == 0:
        raise AttributionError("class_prototypes: no training vectors")
    classes, index = torch.unique(labels, sorted=True, return_inverse=True)
    x = features if features.is_floating_point() else features.float()
    sums = torch.zeros(classes.shape[0], x.shape[1], dtype=torch.float64, device=x.device)
    sums.index_add_(0, index, x.to(torch.float64))
    counts = torch.bincount(index, minlength=classes.shape[0]).to(torch.float64)
    return classes, (sums / counts[:, None]).to(x.dtype)


def prototype_predict(features: Tensor, classes: Tensor, prototypes: Tensor) -> Tensor:
    """Class of the most cosine-similar prototype for each vector: LongTensor [M] from ``features`` [M, K],
    ``classes`` [C] and ``prototypes`` [C, K] (:func:`class_prototypes`). Ties: the lowest class index."""
    _check(features, None, "prototype_predict")
    if prototypes.ndim != 2 or prototypes.shape[1] != features.shape[1] or classes.shape[0] != prototypes.shape[0]:
        raise AttributionError(f"prototype_predict: prototypes {tuple(prototypes.shape)} / classes "
                               f"{tuple(classes.shape)} do not fit features {tuple(features.shape)}")
    a = F.normalize(features.to(torch.float64), dim=1)
    b = F.normalize(prototypes.to(device=features.device, dtype=torch.float64), dim=1)
    similarity = a @ b.T  # [M, C]
    return classes.to(features.device)[similarity.argmax(dim=1)]


def prototype_accuracy(train_features: Tensor, train_labels: Tensor, test_features: Tensor,
                       test_labels: Tensor) -> float:
    """A-FMI §4.1 accuracy: prototypes from the training vectors [N, K] and labels [N], then the share of test
    vectors [M, K] whose nearest prototype (cosine) is their label [M]. Float in [0, 1]; NaN for M = 0."""
    classes, prototypes = class_prototypes(train_features, train_labels)
    test_labels = torch.as_tensor(test_labels, device=test_features.device).long()
    _check(test_features, test_labels, "prototype_accuracy")
    if test_features.shape[0] == 0:
        return float("nan")
    predicted = prototype_predict(test_features, classes, prototypes)
    return float((predicted == test_labels).to(torch.float64).mean())


__all__ = ["class_prototypes", "prototype_accuracy", "prototype_predict"]
