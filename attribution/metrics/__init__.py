"""Metrics of attribution maps: pure, batched functions on torch tensors (any device) or NumPy arrays, no Ray.

One family per module; each module's docstring gives the paper's definition and the choices made where the
papers are silent.

* ``similarity`` — rank (mid-ranks), Pearson, Spearman per row, SSIM (skimage's default), min-max normalisation:
  the sanity checks' similarity scores (TR-GBP §5.2.2 after Adebayo et al.).
* ``roc`` — ROC-AUC via the Mann-Whitney U statistic with mid-ranks (no scikit-learn).
* ``localisation`` — box masks, EBPG (TR-GBP §5.3.1, App. C), IBD (TR-GBP §5.4), the EBPG image filter.
* ``perturbation`` — pixel rankings and batched MoRF/LeRF (TR-GBP §5.3.2, App. D) and insertion (A-FMI App. A.3)
  curves through the model, Accuracy@PI / Softmax-Ratio@PI, normalised curve AUC, the black baseline.
* ``road`` — ROAD (Rong et al. 2022): noisy linear imputation of removed pixels for a batch (CG on the masked
  8-neighbour system, any device) and batched ROAD MoRF/LeRF curves with accuracy, probability and AUCs.
* ``discrimination`` — mean pairwise Spearman correlation of the class maps of an image.
* ``faithfulness`` — FMI class prototypes and cosine-similarity classification accuracy (A-FMI §4.1).
* ``protocols`` — dataset-level protocols: EBPG mean ± std over random subsets, IBD-AUC for wrong predictions.
"""
from attribution.metrics.discrimination import class_discrimination
from attribution.metrics.faithfulness import class_prototypes, prototype_accuracy, prototype_predict
from attribution.metrics.localisation import (border_frame, border_intensity, box_area_share, box_mask,
                                              ebpg_eligible, energy_pointing_game)
from attribution.metrics.perturbation import (black_baseline, curve_auc, insertion, insertion_fractions,
                                              insertion_scores, morf_lerf, perturbation_curves, pixel_order,
                                              removal_fractions, target_probability)
from attribution.metrics.protocols import ebpg_protocol, ibd_auc_protocol, ibd_keep_mask
from attribution.metrics.road import linear_imputation, road_curves
from attribution.metrics.roc import midranks, roc_auc
from attribution.metrics.similarity import minmax, pearson, rank, spearman, ssim

__all__ = [
    "black_baseline", "border_frame", "border_intensity", "box_area_share", "box_mask", "class_discrimination",
    "class_prototypes", "curve_auc", "ebpg_eligible", "ebpg_protocol", "energy_pointing_game", "ibd_auc_protocol",
    "ibd_keep_mask", "insertion", "insertion_fractions", "insertion_scores", "midranks", "minmax", "morf_lerf",
    "pearson", "perturbation_curves", "pixel_order", "prototype_accuracy", "prototype_predict", "rank",
    "linear_imputation", "removal_fractions", "road_curves", "roc_auc", "spearman", "ssim", "target_probability",
]
