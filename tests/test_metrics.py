import cv2
import numpy as np
import pytest
from sklearn.metrics import precision_recall_curve, roc_auc_score

from amoe_sdk.evaluation.metrics import aupro, auroc, f1_max


@pytest.fixture
def scored():
    rng = np.random.default_rng(0)
    labels = rng.random(500) < 0.3
    scores = np.round(rng.random(500) + 0.6 * labels, 2)  # rounding makes ties
    return labels, scores


def test_auroc_matches_sklearn(scored):
    labels, scores = scored
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auroc_one_class_is_nan():
    assert np.isnan(auroc(np.zeros(5), np.arange(5)))


def test_f1_max_matches_sklearn(scored):
    labels, scores = scored
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = np.argmax(f1[:-1])
    value, threshold = f1_max(labels, scores)
    assert value == pytest.approx(f1[best], abs=1e-12)
    assert threshold == pytest.approx(thresholds[best])
    assert 2 * ((scores >= threshold) & labels).sum() / ((scores >= threshold).sum() + labels.sum()) == pytest.approx(value)


def _aupro_brute_force(masks, maps, max_fpr):
    """Every distinct score as a threshold; exact PRO and FPR at each; trapezoid up to max_fpr."""
    regions = []
    for i, mask in enumerate(masks):
        n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        regions += [(i, labels == r) for r in range(1, n)]
    points = []
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fpr = (pred & ~masks).sum() / (~masks).sum()
        pro = np.mean([pred[i][r].mean() for i, r in regions])
        points.append((fpr, pro))
    fpr, pro = np.array([(0.0, 0.0)] + points).T
    keep = fpr <= max_fpr
    x, y = fpr[keep], pro[keep]
    nxt = np.searchsorted(fpr, max_fpr)
    if x[-1] < max_fpr and nxt < fpr.size:
        x, y = np.r_[x, max_fpr], np.r_[y, np.interp(max_fpr, fpr[nxt - 1 : nxt + 1], pro[nxt - 1 : nxt + 1])]
    return np.trapezoid(y, x) / max_fpr


def test_aupro_matches_brute_force():
    rng = np.random.default_rng(1)
    masks = np.zeros((3, 24, 24), bool)
    masks[0, 2:6, 2:6] = masks[0, 15:22, 10:12] = masks[1, 8:20, 3:9] = True  # three regions of unequal size
    maps = np.round(rng.random(masks.shape) + 0.7 * masks, 3)
    expected = _aupro_brute_force(masks, maps, 0.3)
    assert aupro(masks, maps, 0.3, num_thresholds=4000) == pytest.approx(expected, abs=5e-3)


def test_aupro_perfect_and_region_weighting():
    masks = np.zeros((2, 16, 16), bool)
    masks[0, :8, :8] = True
    masks[1, 0, 0] = True
    perfect = masks.astype(float)
    assert aupro(masks, perfect) == pytest.approx(1.0, abs=1e-6)
    # Finding only the large region: PRO is 0.5 at FPR 0 (each region counts equally, whatever its size), and
    # the curve runs straight to (1, 1), so the normalised area up to FPR 0.3 is (0.5 + 0.65) / 2.
    half = perfect.copy()
    half[1] = 0.0
    assert aupro(masks, half) == pytest.approx(0.575, abs=1e-3)
    assert aupro(masks, half) == pytest.approx(_aupro_brute_force(masks, half, 0.3), abs=1e-3)


def test_the_metrics_run_on_numpy_1_which_has_trapz_and_no_trapezoid(scored):
    """pyproject allows NumPy 1.24+ (JetPack ships 1.x), whose integral is ``np.trapz``: imported where
    ``np.trapezoid`` is missing, the metrics take ``trapz`` and give the same figures."""
    import importlib
    import sys

    import amoe_sdk.evaluation.metrics as metrics

    labels, scores = scored
    expected = (auroc(labels, scores), aupro(*_region_case()))
    trapezoid = np.trapezoid
    calls = []

    def trapz(y, x):
        calls.append(1)
        return trapezoid(y, x)

    try:
        del np.trapezoid
        np.trapz = trapz
        numpy_1 = importlib.reload(metrics)
        assert (numpy_1.auroc(labels, scores), numpy_1.aupro(*_region_case())) == pytest.approx(expected, abs=1e-12)
        assert calls
    finally:
        np.trapezoid = trapezoid
        if hasattr(np, "trapz") and np.trapz is trapz:
            del np.trapz
        importlib.reload(sys.modules["amoe_sdk.evaluation.metrics"])


def _region_case():
    masks = np.zeros((2, 32, 32), bool)
    masks[0, 4:12, 4:12] = True
    maps = np.random.default_rng(0).random((2, 32, 32))
    maps[masks] += 0.5
    return masks, maps
