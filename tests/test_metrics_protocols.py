"""ROC-AUC, the dataset-level protocols (EBPG mean ± std, IBD-AUC) and the FMI prototype accuracy, by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from attribution.errors import AttributionError
from attribution.metrics.faithfulness import (
    class_prototypes,
    prototype_accuracy,
    prototype_predict,
)
from attribution.metrics.protocols import ebpg_protocol, ibd_auc_protocol, ibd_keep_mask
from attribution.metrics.roc import midranks, roc_auc


# ------------------------------------------------------------------------------------------------------- ROC-AUC
def test_roc_auc_hand_cases_with_ties():
    assert roc_auc([0.1, 0.4, 0.4, 0.8], [0, 0, 1, 1]) == 0.875  # ranks 1, 2.5, 2.5, 4: (6.5 - 3) / 4
    assert roc_auc([1, 1, 1, 1], [False, True, False, True]) == 0.5  # all tied
    assert roc_auc([0.2, 0.3], [True, False]) == 0.0
    assert roc_auc([0.2, 0.3, 0.3], [False, True, True]) == 1.0
    # positives .3, .9 against negatives .3, .3, .5: (.5 + .5 + 0) + 3 = 4 of 6 pairs
    assert roc_auc([0.3, 0.3, 0.3, 0.5, 0.9], [0, 1, 0, 0, 1]) == pytest.approx(4 / 6)
    assert np.isnan(roc_auc([0.1, 0.2], [1, 1])) and np.isnan(roc_auc([], []))
    assert midranks(np.array([5, 1, 5, 2])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_roc_auc_equals_sklearn_on_random_data_with_ties():
    rng = np.random.default_rng(0)
    for n, levels in ((20, 3), (200, 10), (1000, 1000), (57, 2)):
        scores = rng.integers(0, levels, n) / levels
        labels = rng.random(n) < 0.3 + 0.4 * scores  # informative
        assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert roc_auc_score(labels, scores) != 0.5  # informative labels: not a trivial value


def test_roc_auc_bad_input():
    with pytest.raises(AttributionError, match="NaN"):
        roc_auc([0.1, float("nan")], [0, 1])
    with pytest.raises(AttributionError, match="0/1"):
        roc_auc([0.1, 0.2], [0, 2])
    with pytest.raises(AttributionError, match="3 scores but 2 labels"):
        roc_auc([0.1, 0.2, 0.3], [0, 1])


# ------------------------------------------------------------------------------------------------------- EBPG protocol
def test_ebpg_protocol_hand_values():
    assert ebpg_protocol(np.arange(10.0), sample=10) == (4.5, 0.0)  # every repeat takes all
    assert ebpg_protocol([0.0, 10.0], sample=2, repeats=50) == (5.0, 0.0)  # without replacement: always both
    assert ebpg_protocol([1.0, float("nan"), 1.0], sample=500) == (1.0, 0.0)  # NaN dropped
    mean, std = ebpg_protocol([0.0, 0.0, 0.0, 10.0], sample=2, repeats=400, seed=3)
    # each subset mean is 0 (prob 1/2) or 5 (prob 1/2): mean 2.5, std 2.5
    assert mean == pytest.approx(2.5, abs=0.4) and std == pytest.approx(2.5, abs=0.1)
    a = ebpg_protocol(np.linspace(0, 1, 1000), sample=500, repeats=5, seed=0)
    assert a == ebpg_protocol(np.linspace(0, 1, 1000), sample=500, repeats=5, seed=0)
    assert a != ebpg_protocol(np.linspace(0, 1, 1000), sample=500, repeats=5, seed=1)
    assert 0 < a[1] < 0.03 and a[0] == pytest.approx(0.5, abs=0.03)
    assert all(np.isnan(ebpg_protocol([float("nan")])))


# ------------------------------------------------------------------------------------------------------- IBD-AUC
def test_ibd_auc_protocol_hand_values():
    ibd = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    wrong = [1, 1, 0, 1, 0, 1]
    assert ibd_keep_mask(ibd).tolist() == [False, False, False, True, True, True]
    # kept .4 (wrong), .5 (right), .6 (wrong): pairs (.4 vs .5) 0, (.6 vs .5) 1
    assert ibd_auc_protocol(ibd, wrong) == 0.5
    assert ibd_auc_protocol(ibd, wrong, keep=1.0) == pytest.approx(roc_auc_score(wrong, ibd))
    # ties at the cut are kept together: 3 to keep, but .3 occurs three times at the cut -> 5 kept
    ibd = [0.1, 0.3, 0.3, 0.3, 0.5, 0.9]
    assert ibd_keep_mask(ibd).tolist() == [False, True, True, True, True, True]
    assert ibd_auc_protocol(ibd, [1, 0, 1, 0, 0, 1]) == pytest.approx(4 / 6)
    assert ibd_auc_protocol(ibd[::-1], [1, 0, 1, 0, 0, 1][::-1]) == pytest.approx(4 / 6)  # order-free
    # odd N: drop floor(2.5) = 2 -> keep 3; NaN never kept
    assert ibd_keep_mask([0.5, 0.1, 0.4, 0.2, 0.3, float("nan")]).tolist() == [True, False, True, False, True, False]
    assert np.isnan(ibd_auc_protocol([0.1, 0.2, 0.3, 0.4], [1, 1, 0, 0]))  # kept .3, .4 are all right


# ------------------------------------------------------------------------------------------------------- FMI faithfulness
def test_prototypes_and_cosine_prediction_by_hand():
    train = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
    classes, protos = class_prototypes(train, torch.tensor([0, 0, 5, 5]))
    assert classes.tolist() == [0, 5] and protos.tolist() == [[2.0, 0.0], [0.0, 3.0]]
    test = torch.tensor([[1.0, 0.5], [1.0, 2.0], [1.0, 1.0], [10.0, 9.0]])
    # [1, 1] is a tie -> lowest class; [10, 9] is closer to [0, 3] in Euclidean distance but cosine picks 0
    assert prototype_predict(test, classes, protos).tolist() == [0, 5, 0, 0]
    assert prototype_accuracy(train, torch.tensor([0, 0, 5, 5]), test, torch.tensor([0, 5, 5, 0])) == 0.75
    assert prototype_accuracy(train, torch.tensor([0, 0, 5, 5]), test[:1], torch.tensor([7])) == 0.0  # no prototype


def test_prototype_accuracy_separable_clusters_and_chance():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 64, generator=g) * 3
    labels = torch.arange(10).repeat(30)
    feats = centres[labels] + 0.5 * torch.randn(300, 64, generator=g)
    test_labels = torch.arange(10).repeat(10)
    test = centres[test_labels] + 0.5 * torch.randn(100, 64, generator=g)
    assert prototype_accuracy(feats, labels, test, test_labels) == 1.0
    shuffled = test_labels[torch.randperm(100, generator=g)]
    assert prototype_accuracy(feats, labels, test, shuffled) < 0.4  # labels unrelated to features: ~ chance


def test_faithfulness_bad_input():
    with pytest.raises(AttributionError, match="labels for 3 feature vectors"):
        class_prototypes(torch.zeros(3, 2), torch.zeros(2))
    with pytest.raises(AttributionError, match="do not fit"):
        prototype_predict(torch.zeros(3, 2), torch.tensor([0]), torch.zeros(1, 4))
