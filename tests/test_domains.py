"""models/data/domains.py: items, splits, prompts, answer extraction and the tasks' own scoring."""

import json

import pytest

from branchmerge.models.data.domains import (
    build_items,
    build_messages,
    extract_answer,
    make_shots,
    reward_fn,
    score,
    split_items,
    task_counts,
)

TASKS = [
    {"name": "leg_counting", "weight": 1, "config": {"min_animals": 1, "max_animals": 2, "max_instances": 3}},
    {"name": "gcd", "weight": 1, "config": {"max_value": 50}},
    {"name": "coin_flip", "weight": 1, "config": {"min_trials": 3, "max_trials": 4}},
    {"name": "number_sorting", "weight": 1, "config": {"min_numbers": 3, "max_numbers": 4, "max_decimals": 0}},
    {"name": "word_sequence_reversal", "weight": 1, "config": {"min_words": 3, "max_words": 4}},
    {"name": "chain_sum", "weight": 2,
     "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}},
]


@pytest.fixture(scope="module")
def items():
    return build_items("mix", TASKS, 56, seed=3)


@pytest.mark.parametrize("text, expected", [
    ("<answer>42</answer>", "42"),
    ("so <answer>  7 \n</answer>", "7"),                                  # whitespace stripped
    ("<answer>1</answer> wait, <answer>2</answer>", "2"),                 # last tag wins
    ("<ANSWER>x</Answer>", "x"),                                          # case-insensitive tags
    ("<answer>3</answer> then <answer>5\nbecause", "5"),                  # unclosed final tag: first line
    ("<answer></answer> <answer>9</answer>", "9"),                        # empty tags skipped
    ("<answer>\\boxed{12}</answer>", "12"),                               # boxed inside the tag
    ("thus \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),                      # boxed, nested braces
    ("the answer is 4", None),                                            # no marked answer
    ("<answer>", None),
    ("", None),
    (None, None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_items_are_stable_unique_and_json(items):
    assert len(items) == 56
    assert len({it["id"] for it in items}) == len({it["question"] for it in items}) == 56
    assert [it["id"] for it in build_items("mix", TASKS, 56, seed=3)] == [it["id"] for it in items]
    assert json.loads(json.dumps(items)) == items
    counts = {t["name"]: sum(it["task"] == t["name"] for it in items) for t in TASKS}
    assert counts == dict(zip([t["name"] for t in TASKS], task_counts(TASKS, 56)))
    assert sum(task_counts(TASKS, 56)) == 56 and counts["chain_sum"] == 16


def test_score_uses_the_tasks_score_answer(items):
    for it in items:
        assert score(it, it["answer"]) == 1.0, it
        assert score(it, "no idea") == 0.0, it
        assert score(it, None) == 0.0
    coin = next(it for it in items if it["task"] == "coin_flip")
    num, den = coin["entry"]["metadata"]["rational"].values()
    assert score(coin, f"{num}/{den}") == 1.0  # coin_flip's own scorer accepts fractions


def test_reward_fn_reads_items_from_columns(items):
    its = items[:4]
    completions = [f"ok <answer>{it['answer']}</answer>" for it in its[:2]] + ["<answer>zzz</answer>", "none"]
    by_entry = reward_fn(["p"] * 4, completions, entry=[it["entry"] for it in its], task=[it["task"] for it in its])
    chat = [[{"role": "assistant", "content": c}] for c in completions]
    by_item = reward_fn(["p"] * 4, chat, item=its)
    assert by_entry == by_item == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="entry"):
        reward_fn(["p"], ["x"], question=["q"])


def test_split_has_no_shared_question(items):
    dup = dict(items[0], id="dup")  # same question twice must stay on one side
    train, evals = split_items(items + [dup], eval_size=10, seed=0)
    assert len(evals) >= 10 and len(train) + len(evals) == len(items) + 1
    assert not {it["question"] for it in train} & {it["question"] for it in evals}
    assert split_items(items, 10, 0) == split_items(items, 10, 0)


def test_shots_and_messages(items):
    pool = {it["question"] for it in items}
    shots = make_shots(TASKS, 2, seed=3, exclude=pool)
    assert len(shots) == 2 * len(TASKS)
    for s in shots:
        assert s["question"] not in pool
        assert extract_answer(s["response"]) == s["answer"]
        item = {"task": s["task"], "entry": s["entry"]}
        assert score(item, extract_answer(s["response"])) == 1.0  # worked examples are correct
    it = items[0]
    msgs = build_messages(it, shots)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user"]
    assert msgs[-1]["content"].endswith(it["question"].strip()) and "<answer>" in msgs[-1]["content"]
    assert all(it["task"] == s["task"] for s in shots if s["response"] in [m["content"] for m in msgs])


def test_shots_fall_back_when_the_pool_took_every_question():
    tiny_space = [{"name": "coin_flip", "weight": 1, "config": {"min_trials": 1, "max_trials": 1}}]
    pool = build_items("c", tiny_space, 10, 0)
    assert len(pool) == 4  # exactly/at least x 0/1 heads: the whole space
    shots = make_shots(tiny_space, 1, 0, exclude={it["question"] for it in pool})
    assert len(shots) == 1


def test_bad_task_is_named():
    with pytest.raises(ValueError, match="no_such_task"):
        build_items("d", [{"name": "no_such_task", "weight": 1, "config": {}}], 2, 0)
