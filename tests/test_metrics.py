"""Attribution metrics on hand-made score matrices; every expected number below was worked out by hand."""

import numpy as np
import pytest

from jaxinf.evaluation import (accuracy, bootstrap_ci, cover, evaluate, expected_hits, harmful_evaluation,
                               per_row_metrics, recall_at_k, roc_auc)

# Train groups: a at 0, 2, 5; b at 1, 3, 4.
TRAIN = np.array(["a", "b", "a", "b", "b", "a"])
TEST = np.array(["a", "b", "a"])
SCORES = np.array([
    # ranking: 0(a) 1(b) 3(b) 5(a) 4(b) 2(a)  -> top1 a; top3 has 1 a; AUC 4/9; top2 1 a; top4 2 a
    [0.9, 0.8, 0.1, 0.7, 0.2, 0.5],
    # ranking: 3(b) 4(b) 2(a) 0(a) 1(b) 5(a)  -> top1 b; top3 has 2 b; AUC 7/9; top2 2 b; top4 2 b
    [0.3, 0.1, 0.6, 0.9, 0.8, 0.0],
    # ranking: 1(b) 5(a) 2(a) 3(b) 0(a) 4(b)  -> top1 b (miss); top3 has 2 a; AUC 5/9; top2 1 a; top4 2 a
    [0.2, 0.9, 0.4, 0.3, 0.1, 0.6],
])


def test_hand_made_matrix():
    rows = per_row_metrics(SCORES, TEST, TRAIN, ks=(2, 4))
    np.testing.assert_allclose(rows["acc"], [1, 1, 0])
    np.testing.assert_allclose(rows["cover"], [1 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(rows["auc"], [4 / 9, 7 / 9, 5 / 9])
    np.testing.assert_allclose(rows["recall@2"], [1 / 3, 2 / 3, 1 / 3])
    np.testing.assert_allclose(rows["recall@4"], [2 / 3, 2 / 3, 2 / 3])
    assert accuracy(SCORES, TEST, TRAIN) == pytest.approx(2 / 3)
    assert cover(SCORES, TEST, TRAIN) == pytest.approx(5 / 9)
    assert roc_auc(SCORES, TEST, TRAIN) == pytest.approx(16 / 27)
    assert recall_at_k(SCORES, TEST, TRAIN, 2) == pytest.approx(4 / 9)
    assert recall_at_k(SCORES, TEST, TRAIN, 6) == pytest.approx(1.0)
    out = evaluate(SCORES, TEST, TRAIN, ks=(2,), n_boot=200)
    assert out["acc"]["value"] == pytest.approx(2 / 3)
    assert out["cover"]["value"] == pytest.approx(5 / 9)
    assert out["per_group"]["a"] == {"acc": 0.5, "cover": pytest.approx(0.5), "n": 2}
    assert out["per_group"]["b"] == {"acc": 1.0, "cover": pytest.approx(2 / 3), "n": 1}
    assert out["n_test"] == 3 and out["n_without_relevant"] == 0


def test_flipping_the_sign_changes_the_metrics():
    """Larger = more influential: negating the scores reverses the ranking (AUC -> 1 - AUC)."""
    np.testing.assert_allclose(per_row_metrics(-SCORES, TEST, TRAIN)["auc"], [5 / 9, 2 / 9, 4 / 9])
    np.testing.assert_allclose(per_row_metrics(-SCORES, TEST, TRAIN)["acc"], [1, 0, 0])


def test_constant_scores_on_a_grouped_file_are_not_rewarded():
    """The study lists groups contiguously: index-order tie-breaking would score Acc = Cover = 1 here."""
    train = np.array(["a", "a", "b", "b", "b", "b"])
    test = np.array(["a", "b"])
    s = np.zeros((2, 6))
    rows = per_row_metrics(s, test, train)
    np.testing.assert_allclose(rows["acc"], [2 / 6, 4 / 6])          # fraction of the group among the ties
    np.testing.assert_allclose(rows["cover"], [(2 * 2 / 6) / 2, (4 * 4 / 6) / 4])  # = [1/3, 2/3]
    np.testing.assert_allclose(rows["auc"], [0.5, 0.5])


def test_partial_ties_expected_counts():
    # groups:  b    a    b    b    a    a     (test row is "a", c = 3)
    s = np.array([[5.0, 3.0, 3.0, 3.0, 1.0, 1.0]])
    train = np.array(["b", "a", "b", "b", "a", "a"])
    rows = per_row_metrics(s, np.array(["a"]), train, ks=(1, 2))
    assert rows["acc"][0] == 0.0                                  # row 0 (b) is strictly first
    assert rows["cover"][0] == pytest.approx((2 * 1 / 3) / 3)     # top 3 = {0} + 2 of the 3 tied rows (1 relevant)
    assert rows["recall@2"][0] == pytest.approx((1 / 3) / 3)
    assert rows["recall@1"][0] == 0.0
    assert rows["auc"][0] == pytest.approx(1 / 9)                 # pairs: (3 vs 3) twice at 1/2, rest 0


def test_minus_infinity_scores_from_candidate_filtering_tie_at_the_bottom():
    # groups:   a        b    a        b      (test row "a", c = 2; -inf = not a TF-IDF candidate)
    s = np.array([[-np.inf, 1.0, -np.inf, -np.inf]])
    rows = per_row_metrics(s, np.array(["a"]), np.array(["a", "b", "a", "b"]))
    assert rows["acc"][0] == 0.0
    assert rows["cover"][0] == pytest.approx((1 * 2 / 3) / 2)     # top 2 = {1} + 1 of 3 tied rows (2 relevant)
    assert rows["auc"][0] == pytest.approx(1 / 4)                 # each positive: 0 vs 1.0, 1/2 vs -inf


def test_random_tie_breaking_is_seeded_and_not_index_order():
    train = np.array(["a"] * 50 + ["b"] * 50)
    test = np.array(["a"] * 4)
    s = np.zeros((4, 100))
    c1 = per_row_metrics(s, test, train, ties="random", seed=1)["cover"]
    c1_again = per_row_metrics(s, test, train, ties="random", seed=1)["cover"]
    c2 = per_row_metrics(s, test, train, ties="random", seed=2)["cover"]
    np.testing.assert_array_equal(c1, c1_again)
    seeded = {float(per_row_metrics(s, test, train, ties="random", seed=k, ks=(7,))["recall@7"][0]) for k in range(6)}
    assert len(seeded) > 1                                        # the seed matters
    assert 0.25 < c1[0] < 0.75 and 0.25 < c2[0] < 0.75           # ~ hypergeometric mean 0.5, never the 1.0 of index order
    # Without ties, "random" equals the exact ranking.
    np.testing.assert_allclose(per_row_metrics(SCORES, TEST, TRAIN, ties="random", ks=(2,))["recall@2"],
                               [1 / 3, 2 / 3, 1 / 3])
    # expected_hits with averaging == mean over many random tie orders (law of large numbers check).
    rel = (train[None, :] == "a")[:1]
    draws = [expected_hits(s[:1], rel, 10, ties="random", seed=k)[0] for k in range(400)]
    assert np.mean(draws) == pytest.approx(expected_hits(s[:1], rel, 10)[0], abs=0.3)
    assert expected_hits(s[:1], rel, 10)[0] == pytest.approx(5.0)


def test_harmful_helper_collapses_other_groups_and_uses_c_equal_to_harmful_count():
    train = np.array(["benign", "harmful", "alpaca", "harmful", "benign", "harmful", "alpaca"])
    # Two test rows (labels are irrelevant: every test row counts as harmful).
    s = np.array([
        [0.0, 0.9, 0.8, 0.7, 0.1, 0.2, 0.3],   # top1 harmful; top3 = {1, 2, 3}: 2 harmful -> 2/3
        [0.9, 0.1, 0.2, 0.3, 0.5, 0.6, 0.4],   # top1 benign; top3 = {0, 5, 4}: 1 harmful -> 1/3
    ])
    out = harmful_evaluation(s, train, n_boot=100)
    assert out["n_relevant"] == 3
    assert out["acc"]["value"] == pytest.approx(0.5)
    assert out["cover"]["value"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    # row 0: positives {0.9, 0.7, 0.2}, negatives {0.0, 0.8, 0.1, 0.3}: 4 + 3 + 2 = 9 of 12
    # row 1: positives {0.1, 0.3, 0.6}, negatives {0.9, 0.2, 0.5, 0.4}: 0 + 1 + 3 = 4 of 12 -> 1/3
    assert out["auc"]["value"] == pytest.approx((9 / 12 + 4 / 12) / 2)
    with pytest.raises(ValueError, match="harmful"):
        harmful_evaluation(s, np.array(["x"] * 7))


def test_group_without_training_rows():
    out = per_row_metrics(SCORES, np.array(["a", "b", "z"]), TRAIN)
    assert out["acc"][2] == 0.0 and np.isnan(out["cover"][2]) and np.isnan(out["auc"][2])
    assert evaluate(SCORES, np.array(["a", "b", "z"]), TRAIN, n_boot=10)["n_without_relevant"] == 1


def test_nan_scores_rejected():
    s = SCORES.copy()
    s[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        accuracy(s, TEST, TRAIN)


def test_bootstrap_ci():
    rng = np.random.default_rng(0)
    v = (rng.random(400) < 0.5).astype(float)
    lo, hi = bootstrap_ci(v, n_boot=1000, seed=3)
    assert (lo, hi) == bootstrap_ci(v, n_boot=1000, seed=3)        # deterministic given the seed
    assert (lo, hi) != bootstrap_ci(v, n_boot=1000, seed=4)
    assert lo < v.mean() < hi
    # Normal approximation: width ~ 2 * 1.96 * sqrt(p (1 - p) / n) = 0.098 for p ~ 0.5, n = 400.
    assert 0.08 < hi - lo < 0.12
    assert bootstrap_ci(np.full(10, 0.3), n_boot=50) == pytest.approx((0.3, 0.3))
    lo90, hi90 = bootstrap_ci(v, n_boot=1000, seed=3, level=0.9)
    assert lo < lo90 < hi90 < hi
    out = evaluate(SCORES, TEST, TRAIN, n_boot=500, seed=7)
    for name in ("acc", "cover", "auc", "recall@5"):
        lo, hi = out[name]["ci"]
        assert lo <= out[name]["value"] <= hi
    assert out == evaluate(SCORES, TEST, TRAIN, n_boot=500, seed=7)
    # --bootstrap=0: values without intervals (was an IndexError from np.quantile of nothing)
    assert np.isnan(bootstrap_ci(v, n_boot=0)).all()
    assert evaluate(SCORES, TEST, TRAIN, n_boot=0)["acc"]["value"] == out["acc"]["value"]
