"""Aioli controller (models/data/aioli.py): formulas on hand-computed inputs, un-mixing of a known linear law, and a
simulated training loop driven through the schedule."""

import itertools
import json
import math

import numpy as np
import pytest

from branchmerge.models.data.aioli import (
    AioliConfig,
    AioliSchedule,
    batch_counts,
    estimate_A,
    history_records,
    normalize_A,
    plot_proportions,
    smoothed_one_hot,
    smoothing_matrix,
    update_proportions,
)

GROUPS = ("a", "b", "c")


def config(**overrides) -> AioliConfig:
    values = {"groups": GROUPS, "eta": 0.5, "lp_rounds": 4, "lp_steps": 4, "one_hot_factor": 0.625, "update_steps": 64,
              "ema": None, "prior": None, "prior_steps": 0, "normalize_A": True, "diagonal": False, "seed": 0}
    return AioliConfig(**{**values, **overrides})


# ------------------------------------------------------------------------------------------------- formulas
def test_smoothed_one_hot_rows():
    assert smoothed_one_hot(3, 0, 0.625).tolist() == [0.625, 0.1875, 0.1875]
    np.testing.assert_allclose(smoothed_one_hot(4, 2, 0.7), [0.1, 0.1, 0.7, 0.1], rtol=0, atol=1e-15)
    assert smoothed_one_hot(3, 1, 1.0).tolist() == [0.0, 1.0, 0.0]
    W = smoothing_matrix(3, 0.625)
    assert W.tolist() == [[0.625, 0.1875, 0.1875], [0.1875, 0.625, 0.1875], [0.1875, 0.1875, 0.625]]
    for f in (1 / 3, 0.2, 1.01):
        with pytest.raises(ValueError, match="one_hot_factor"):
            smoothed_one_hot(3, 0, f)


# A non-symmetric law with negative entries: orientation (measured i, trained j) and the shift both matter.
A_TRUE = np.array([[3.0, -1.0, 0.0], [1.0, 2.0, -1.0], [0.0, 1.0, 4.0]])


def linear_drops(A, f, lp_rounds):
    """drops[r, j, i] = (A @ w_j)_i, w_j written out by hand (not via the module), plus per-sweep offsets that
    cancel in the mean over sweeps."""
    k = A.shape[0]
    rows = [[f if i == j else (1 - f) / (k - 1) for i in range(k)] for j in range(k)]
    drops = np.array([[A @ np.array(rows[j]) for j in range(k)] for _ in range(lp_rounds)])
    offsets = np.random.default_rng(0).normal(size=(lp_rounds, k, k))
    return drops + offsets - offsets.mean(axis=0)


@pytest.mark.parametrize("f", [0.625, 0.5, 0.9])
def test_estimate_A_unmixes_a_linear_law(f):
    drops = linear_drops(A_TRUE, f, lp_rounds=3)
    np.testing.assert_allclose(estimate_A(drops, f, normalize=False), A_TRUE, atol=1e-12)
    # shift by -min = +1, divide by the total 18
    expected = np.array([[4.0, 0.0, 1.0], [2.0, 3.0, 0.0], [1.0, 2.0, 5.0]]) / 18
    np.testing.assert_allclose(estimate_A(drops, f, normalize=True), expected, atol=1e-12)


def test_estimate_A_one_hot_and_diagonal():
    drops = linear_drops(A_TRUE, 1.0, lp_rounds=2)  # plain one-hots: the drops are A's columns
    np.testing.assert_allclose(estimate_A(drops, 1.0, normalize=False), A_TRUE, atol=1e-12)
    # diagonal: (A w_i)_i / f by hand: (3*.625 - .1875) / .625 = 2.7, (.1875 + 1.25 - .1875) / .625 = 2,
    # (.1875 + 2.5) / .625 = 4.3
    drops = linear_drops(A_TRUE, 0.625, lp_rounds=2)
    np.testing.assert_allclose(estimate_A(drops, 0.625, normalize=False, diagonal=True), np.diag([2.7, 2.0, 4.3]),
                               atol=1e-12)


def test_normalize_A():
    # min >= 0: no shift, only the division (a shift would give [[0, 1], [2, 3]] / 6)
    np.testing.assert_allclose(normalize_A(np.array([[1.0, 2.0], [3.0, 4.0]])), [[0.1, 0.2], [0.3, 0.4]])
    np.testing.assert_allclose(normalize_A(np.array([[-2.0, 0.0], [1.0, 2.0]])), [[0, 2 / 9], [3 / 9, 4 / 9]])
    assert normalize_A(np.full((2, 2), -0.5)).tolist() == [[0.0, 0.0], [0.0, 0.0]]  # no information
    assert normalize_A(np.zeros((2, 2))).tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_update_proportions_multiplicative():
    p = np.array([0.5, 0.3, 0.2])
    A = np.array([[0.1, 0.2, 0.0], [0.05, 0.1, 0.15], [0.0, 0.1, 0.3]])  # column sums 0.15, 0.4, 0.45
    w = [0.5 * math.exp(0.5 * 0.15), 0.3 * math.exp(0.5 * 0.4), 0.2 * math.exp(0.5 * 0.45)]
    new, A_ema = update_proportions(p, A, eta=0.5, ema=None)
    np.testing.assert_allclose(new, [x / sum(w) for x in w], rtol=1e-14)
    assert A_ema is None
    new, _ = update_proportions(np.array([0.0, 0.5, 0.5]), A, eta=0.5, ema=None)  # a zero weight stays zero
    w = [math.exp(0.5 * 0.4), math.exp(0.5 * 0.45)]
    np.testing.assert_allclose(new, [0.0, w[0] / sum(w), w[1] / sum(w)], rtol=1e-14)
    with pytest.raises(ValueError, match="eta"):
        update_proportions(p, A, eta=0.0, ema=None)


def test_update_proportions_ema():
    A1 = np.array([[0.2, 0.1, 0.0], [0.3, 0.1, 0.05], [0.1, 0.1, 0.05]])  # column sums 0.6, 0.3, 0.1
    A2 = np.array([[0.0, 0.1, 0.3], [0.0, 0.0, 0.2], [0.1, 0.0, 0.3]])
    p0 = np.array([0.7, 0.2, 0.1])  # ignored by the EMA variant (reference: weights_init * exp(...))
    p1, E1 = update_proportions(p0, A1, eta=0.2, ema=0.25, A_ema=None)
    w = [math.exp(0.2 * 0.6), math.exp(0.2 * 0.3), math.exp(0.2 * 0.1)]
    np.testing.assert_allclose(p1, [x / sum(w) for x in w], rtol=1e-14)
    np.testing.assert_array_equal(E1, A1)
    p2, E2 = update_proportions(p1, A2, eta=0.2, ema=0.25, A_ema=E1)
    # 0.75 * A2 + 0.25 * A1, by hand; column sums 0.225, 0.15, 0.625
    np.testing.assert_allclose(E2, [[0.05, 0.1, 0.225], [0.075, 0.025, 0.1625], [0.1, 0.025, 0.2375]], atol=1e-15)
    w = [math.exp(0.2 * 0.225), math.exp(0.2 * 0.15), math.exp(0.2 * 0.625)]
    np.testing.assert_allclose(p2, [x / sum(w) for x in w], rtol=1e-14)


def test_batch_counts_as_the_reference():
    assert batch_counts([0.625, 0.1875, 0.1875], 8).tolist() == [5, 1, 2]  # int(1.5) = 1, the last takes the rest
    assert batch_counts([0.1875, 0.1875, 0.625], 8).tolist() == [1, 1, 6]
    assert batch_counts([0.5, 0.25, 0.25], 8).tolist() == [4, 2, 2]
    with pytest.raises(ValueError, match="batch_size"):
        batch_counts([0.25] * 4, 2)


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("overrides, name", [
    ({"eta": 0.0}, "eta"), ({"eta": -1.0}, "eta"), ({"one_hot_factor": 1 / 3}, "one_hot_factor"),
    ({"one_hot_factor": 1.2}, "one_hot_factor"), ({"groups": ("a",)}, "groups"), ({"groups": ("a", "a")}, "groups"),
    ({"prior": {"a": 1.0, "b": 1.0, "z": 1.0}, "prior_steps": 4}, "prior"), ({"prior_steps": 4}, "prior"),
    ({"ema": 1.0}, "ema"), ({"lp_rounds": 0}, "lp_rounds"), ({"lp_steps": 0}, "lp_steps"),
    ({"diagonal": True, "one_hot_factor": 1.0}, "diagonal"), ({"update_steps": 0}, "update_steps"),
])
def test_config_rejects(overrides, name):
    with pytest.raises(ValueError, match=name):
        config(**overrides)


def test_schedule_rejects_budgets_that_do_not_fit():
    with pytest.raises(ValueError, match="lp_steps"):  # 4 * 3 * 4 = 48 LearnParams steps >= 48
        AioliSchedule(config(update_steps=48), total_steps=96)
    with pytest.raises(ValueError, match="update_steps"):
        AioliSchedule(config(), total_steps=100)
    with pytest.raises(ValueError, match="update_steps"):
        AioliSchedule(config(), total_steps=32)
    with pytest.raises(ValueError, match="update_steps"):  # the prior eats into the budget
        AioliSchedule(config(prior={"a": 1.0, "b": 1.0, "c": 1.0}, prior_steps=10), total_steps=128)


def test_schedule_protocol_errors():
    s = AioliSchedule(config(), total_steps=64)
    assert s.needs_eval()
    with pytest.raises(RuntimeError, match="record_losses"):
        s.next_mixture()
    with pytest.raises(ValueError, match=r"unknown groups \['z'\]"):
        s.record_losses({"a": 1.0, "b": 1.0, "z": 1.0})
    with pytest.raises(ValueError, match=r"missing groups \['c'\]"):
        s.record_losses({"a": 1.0, "b": 1.0})
    with pytest.raises(ValueError, match="finite"):
        s.record_losses({"a": 1.0, "b": float("nan"), "c": 1.0})
    s.record_losses({"a": 1.0, "b": 1.0, "c": 1.0})
    with pytest.raises(RuntimeError, match="no eval is due"):
        s.record_losses({"a": 1.0, "b": 1.0, "c": 1.0})


# ---------------------------------------------------------------------------------------- simulated training
# Per training step on mixture q the losses drop by LAW @ q (+ noise): group c helps every group most.
LAW = 0.01 * np.array([[1.0, 0.0, 2.0], [0.0, 0.5, 2.0], [0.2, 0.2, 3.0]])
PRIOR = {"a": 1.0, "b": 1.0, "c": 2.0}


def simulate(cfg, total_steps, noise_seed=0, noise=1e-3):
    """Drive the schedule like a training loop; returns it and the per-step log (phase, group, mixture)."""
    s = AioliSchedule(cfg, total_steps)
    rng = np.random.default_rng(noise_seed)
    loss = np.full(len(cfg.groups), 5.0)
    steps = []
    while not s.done:
        if s.needs_eval():
            s.record_losses(dict(zip(cfg.groups, loss)))
            continue
        r, phase, group, until = s.round, s.phase, s.current_group, s.steps_until_eval()
        q = s.next_mixture()
        steps.append((r, phase, group, until, q))
        loss = loss - LAW @ np.array([q[g] for g in cfg.groups]) + rng.normal(0, noise, loss.shape)
    return s, steps


def test_simulated_loop_moves_to_the_useful_group_with_exact_accounting():
    cfg = config(prior=PRIOR, prior_steps=10)
    rounds, k, lp, train = 6, 3, 4 * 3 * 4, 64 - 4 * 3 * 4
    s, steps = simulate(cfg, total_steps=10 + rounds * 64)
    assert s.counts == {"prior": 10, "learn_params": rounds * lp, "train": rounds * train,
                        "evals": rounds * (4 * k + 1)}
    assert s.step == len(steps) == 10 + rounds * 64 and s.n_rounds == rounds
    with pytest.raises(RuntimeError, match="done"):
        s.next_mixture()

    # the prior phase samples the normalised prior; the rounds start from uniform (as the reference)
    assert [q for _, phase, _, _, q in steps[:10]] == [{"a": 0.25, "b": 0.25, "c": 0.5}] * 10
    assert s.history[0].round == 0 and s.history[0].step == 10
    np.testing.assert_allclose(list(s.history[0].proportions.values()), [1 / 3] * 3)

    # each round: lp_rounds sweeps, each a permutation of the groups in blocks of lp_steps steps on the smoothed
    # one-hot, then `train` steps on the round's learned p
    # (the order: lp_rounds independent permutations per round, drawn in turn from default_rng(seed))
    order_rng = np.random.default_rng(cfg.seed)
    for r in range(1, rounds + 1):
        lp_steps = [st for st in steps if st[0] == r and st[1] == "learn_params"]
        blocks = [st[2] for st in lp_steps[::4]]
        assert all(st[2] == blocks[i // 4] for i, st in enumerate(lp_steps))
        assert blocks == [GROUPS[j] for _ in range(4) for j in order_rng.permutation(k)]
        for _, _, g, until, q in lp_steps:
            assert q == dict(zip(GROUPS, smoothed_one_hot(3, GROUPS.index(g), 0.625).tolist()))
        assert [st[3] for st in lp_steps[:4]] == [4, 3, 2, 1]  # steps_until_eval within a block
        train_steps = [st for st in steps if st[0] == r and st[1] == "train"]
        assert len(train_steps) == train and train_steps[0][3] == train
        assert all(st[4] == s.history[r].proportions for st in train_steps)
        assert s.history[r].step == 10 + (r - 1) * 64 + lp

        # the loop's drop bookkeeping recovers the law: lp_steps steps per block, so A_raw ~ lp_steps * LAW
        np.testing.assert_allclose(s.history[r].A_raw, 4 * LAW, atol=0.01)
        np.testing.assert_allclose(s.history[r].A, normalize_A(s.history[r].A_raw))

    p_c = [rec.proportions["c"] for rec in s.history]
    assert all(b > a for a, b in itertools.pairwise(p_c)) and p_c[-1] > 0.6, p_c


def test_simulated_loop_ema_variant():
    s, _ = simulate(config(ema=0.5), total_steps=4 * 64)
    ema = None
    for rec in s.history[1:]:
        ema = rec.A if ema is None else 0.5 * rec.A + 0.5 * ema
        np.testing.assert_allclose(rec.A_ema, ema, atol=1e-15)
        w = np.exp(0.5 * ema.sum(axis=0))
        np.testing.assert_allclose(list(rec.proportions.values()), w / w.sum(), rtol=1e-12)
        assert max(rec.proportions, key=rec.proportions.get) == "c"


def test_deterministic_for_a_seed():
    def run(seed):
        s, steps = simulate(config(seed=seed), total_steps=2 * 64)
        return [(st[2], st[4]) for st in steps], [rec.proportions for rec in s.history]

    first, again, other = run(0), run(0), run(1)
    assert first == again
    assert [g for g, _ in first[0]] != [g for g, _ in other[0]]  # the LearnParams order depends on the seed


def test_history_plot_and_records(tmp_path):
    s, _ = simulate(config(), total_steps=3 * 64)
    path = plot_proportions(s.history, tmp_path / "aioli.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    records = json.loads(json.dumps(history_records(s.history)))
    assert [r["round"] for r in records] == [0, 1, 2, 3] and records[0]["A"] is None
    assert np.array(records[2]["drops"]).shape == (4, 3, 3)
    assert s.history[1].metrics()["aioli.p.c"] == s.history[1].proportions["c"]
    assert set(s.history[1].metrics()) == {f"aioli.{m}.{g}" for m in ("p", "A_colsum") for g in GROUPS}


# ------------------------------------------------------------------------------- driven by the SFT loop (tiny model)
def test_aioli_drives_the_mixture_baselines_sft(tiny_model_dir, tmp_path):
    """sft.mixing=aioli on the tiny model: the step accounting is the schedule's formula, each round's p is
    logged and written, and p moves only through the update (it starts uniform)."""
    from branchmerge.flows.config import compose
    from branchmerge.models.training.aioli_sft import train_sft_aioli

    def example(q, a):
        return {"messages": [{"role": "user", "content": f"What is {q}?"}], "completion": f"<answer>{a}</answer>"}

    groups = {"add": [example(f"{i} + {i}", 2 * i) for i in range(12)],
              "mul": [example(f"{i} x 3", 3 * i) for i in range(12)]}
    dev = {"add": [example("7 + 7", 14), example("9 + 9", 18)], "mul": [example("5 x 3", 15)]}
    cfg = compose(["experiment=tiny", "sft.mixing=aioli", "sft.epochs=6", "sft.batch_size=4",
                   "sft.aioli.rounds=2", "sft.aioli.lp_rounds=1", "sft.aioli.lp_steps=2"]).sft
    metrics = train_sft_aioli(cfg, tiny_model_dir, groups, dev, tmp_path / "out", seed=0, progress=False)
    total = 6 * 24 // 4  # epochs x steps per epoch over the union (24 examples, batch 4) = 36, 2 rounds of 18
    assert metrics["steps"] == total
    lp = 2 * 1 * 2 * 2  # rounds x lp_rounds x domains x lp_steps
    assert metrics["aioli"]["counts"] == {"prior": 0, "learn_params": lp, "train": total - lp,
                                          "evals": 2 * (1 + 1 * 2)}  # a round: before LearnParams + after each block
    written = json.loads((tmp_path / "out" / "aioli.json").read_text())
    proportions = [r["proportions"] for r in written["rounds"]]
    assert proportions == metrics["aioli"]["proportions"] and len(proportions) == 3  # the start and 2 updates
    assert proportions[0] == {"add": 0.5, "mul": 0.5}
    assert all(sum(p.values()) == pytest.approx(1.0) for p in proportions)
    assert (tmp_path / "out" / "aioli.png").stat().st_size > 0
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_aioli_keeps_the_branches_and_checks_its_round_budget():
    from branchmerge.flows.config import compose
    from branchmerge.models.training.aioli_sft import aioli_config
    from branchmerge.tasks.registry import dry_run

    static, online = (dry_run(compose(["experiment=tiny", f"sft.mixing={m}"])) for m in ("static", "aioli"))
    assert static["sft/gcd"][0].key == online["sft/gcd"][0].key  # a one-domain branch does not mix
    assert static["sft/mixture"][0].key != online["sft/mixture"][0].key
    dmt = [dry_run(compose(["experiment=tiny", "sft.recipe=dmt", f"sft.mixing={m}"])) for m in ("static", "aioli")]
    assert dmt[0]["sft/gcd"][0].key != dmt[1]["sft/gcd"][0].key  # DMT's stage 2 mixes the other domains
    cfg = compose(["experiment=tiny", "sft.mixing=aioli", "sft.aioli.rounds=4"]).sft
    with pytest.raises(ValueError, match=r"a round has 5 steps .* LearnParams take .* = 6"):
        aioli_config(cfg, ["a", "b", "c"], 20, seed=0)


def test_dmt_stage_two_mixes_its_domains_online(tiny_model_dir, tmp_path):
    """recipes.train_recipe with sft.mixing=aioli: the one-domain stage 1 trains as usual, DMT's stage 2 (the
    other domains + the replay) with Aioli over its domains."""
    from branchmerge.flows.config import compose
    from branchmerge.models.training.recipes import dmt_stages, train_recipe

    def example(domain, i):
        return {"domain": domain, "messages": [{"role": "user", "content": f"{domain} {i}?"}],
                "completion": f"<answer>{i}</answer>"}

    own = [example("gcd", i) for i in range(8)]
    general = [example("lcm", i) for i in range(8)] + [example("arithmetic", i) for i in range(8)]
    dev = {d: [example(d, 100 + i) for i in range(2)] for d in ("gcd", "lcm", "arithmetic")}
    cfg = compose(["experiment=tiny", "sft.recipe=dmt", "sft.mixing=aioli", "sft.epochs=4", "sft.batch_size=4",
                   "sft.aioli.rounds=1", "sft.aioli.lp_rounds=1", "sft.aioli.lp_steps=1"]).sft
    stages = dmt_stages(own, general, cfg.dmt_k, seed=0)
    metrics = train_recipe(cfg, tiny_model_dir, stages, tmp_path / "out", seed=0, dev=dev, progress=False)
    first, second = metrics["stages"]
    assert "aioli" not in first and first["steps"] == 4 * 2  # 8 examples, batch 4, 4 epochs
    assert set(second["aioli"]["proportions"][0]) == {"gcd", "lcm", "arithmetic"}  # replay + the general domains
    assert second["aioli"]["counts"]["learn_params"] == 3  # 1 sweep x 3 domains x 1 step
