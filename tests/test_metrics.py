"""Evaluation metrics against independent references: pass@k by enumerating subsets, Wilson by scipy, the
bootstrap by its own definition, paired comparisons on constructed data."""
import itertools
import math
import random

import numpy as np
import pytest
from scipy.stats import binomtest

from branchmerge.models.eval.metrics import majority_score, paired, pass_at_k, summarize, wilson


@pytest.mark.parametrize("n, correct, k", [(4, 0, 1), (4, 1, 1), (4, 1, 2), (5, 2, 3), (6, 3, 6), (6, 5, 2)])
def test_pass_at_k_is_the_share_of_k_subsets_with_a_correct_sample(n, correct, k):
    samples = [1] * correct + [0] * (n - correct)
    subsets = list(itertools.combinations(range(n), k))
    expected = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, correct, k) == pytest.approx(expected)


def test_majority_vote():
    assert majority_score(["4", "5", "4", None], [1.0, 0.0, 1.0, 0.0]) == 1.0
    assert majority_score(["5", "4", "4", "5"], [0.0, 1.0, 1.0, 0.0]) == 0.0  # tie: the earliest answer, "5"
    assert majority_score([None, " "], [0.0, 0.0]) == 0.0
    assert majority_score([" 7", "7 "], [1.0, 1.0]) == 1.0  # answers compared stripped


@pytest.mark.parametrize("k, n", [(0, 96), (3, 10), (48, 96), (96, 96), (1, 24)])
def test_wilson_matches_scipy(k, n):
    assert wilson(k, n) == pytest.approx(binomtest(k, n).proportion_ci(method="wilson"), abs=1e-9)


def rows_for(scores: dict[str, list[float]], tokens: int = 10) -> list[dict]:
    return [{"id": f"{d}/{i}", "domain": d, "score": s, "answer": "x" if s else None, "num_tokens": tokens + i}
            for d, values in scores.items() for i, s in enumerate(values)]


def test_summarize_values_and_intervals():
    rng = random.Random(0)
    scores = {"a": [float(rng.random() < 0.3) for _ in range(96)], "b": [float(rng.random() < 0.6) for _ in range(96)]}
    out = summarize(rows_for(scores))
    for d, values in scores.items():
        got = out["domains"][d]["pass@1"]
        assert got["value"] == pytest.approx(sum(values) / 96) and got["ci"] == pytest.approx(wilson(sum(values), 96))
        assert got["ci"][1] - got["ci"][0] <= 0.2  # the half-width the default split is sized for
    overall = out["overall"]["pass@1"]
    pooled = sum(scores["a"]) + sum(scores["b"])
    assert overall["value"] == pytest.approx(pooled / 192) and overall["ci"] == pytest.approx(wilson(pooled, 192))
    tokens = out["overall"]["mean_tokens"]  # a bootstrap: the mean of 10..105, its interval near +-1.96 sd/sqrt(n)
    half = 1.96 * np.std(np.arange(10, 106)) / math.sqrt(96) / math.sqrt(2)  # two equal domains, same values
    assert tokens["value"] == pytest.approx(57.5)
    assert tokens["ci"][1] - tokens["ci"][0] == pytest.approx(2 * half, rel=0.15)
    assert summarize(rows_for(scores)) == out  # seeded


def test_sampled_metrics():
    rows = [{"id": "a/0", "domain": "a", "score": 0.0, "answer": None, "num_tokens": 3,
             "sample_answers": ["1", "2", "2", None], "sample_scores": [1.0, 0.0, 0.0, 0.0]},
            {"id": "a/1", "domain": "a", "score": 1.0, "answer": "5", "num_tokens": 3,
             "sample_answers": ["5", "5", "6", "5"], "sample_scores": [1.0, 1.0, 0.0, 1.0]}]
    out = summarize(rows, k=4)["domains"]["a"]
    assert out["pass@k"]["value"] == pytest.approx(1.0) and out["maj@k"]["value"] == pytest.approx(0.5)


def test_paired_comparison():
    rng = random.Random(1)
    base = {d: [float(rng.random() < 0.4) for _ in range(96)] for d in ("a", "b")}
    same = paired(rows_for(base), rows_for(base))
    assert same["difference"] == 0.0 and same["p"] == 1.0
    better = {d: [1.0 if (v or rng.random() < 0.5) else 0.0 for v in values] for d, values in base.items()}
    result = paired(rows_for(better), rows_for(base))
    gain = np.mean([np.mean(better[d]) - np.mean(base[d]) for d in base])
    assert result["difference"] == pytest.approx(gain) and result["p"] < 0.001
    assert result["ci"][0] > 0 and result["ci"][0] < gain < result["ci"][1]
    with pytest.raises(ValueError, match="same prompts"):
        paired(rows_for(base), rows_for({"a": base["a"]}))
