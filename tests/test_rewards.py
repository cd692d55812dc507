"""models/training/rewards.py: each reward on hand-written completions for real reasoning-gym items, the
math-verify fallback, ReFT's partial reward, the length levels, TRL's aggregation in combine, the registry."""

import math
import pickle
from fractions import Fraction

import pytest

from branchmerge.models.data import domains
from branchmerge.models.data.domains import build_items, make_shots, reward_fn, score
from branchmerge.models.training import rewards
from branchmerge.models.training.config import REWARD_NAMES
from branchmerge.models.training.rewards import (
    LENGTH_LEVELS,
    REWARDS,
    combine,
    correctness,
    format_reward,
    get_reward,
    length,
    math_equal,
    partial,
    reward_names,
)

TASKS = [
    {"name": "products", "weight": 1, "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}},
    {"name": "decimal_chain_sum", "weight": 1,
     "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1,
                "min_decimal_places": 1, "max_decimal_places": 1}},
    {"name": "gcd", "weight": 1, "config": {"min_numbers": 2, "max_numbers": 2, "min_value": 2, "max_value": 20}},
    {"name": "fraction_simplification", "weight": 1, "config": {"max_value": 30, "styles": ["plain"]}},
    {"name": "word_sequence_reversal", "weight": 1, "config": {"min_words": 3, "max_words": 4}},
]


@pytest.fixture(scope="module")
def items():
    return build_items("mix", TASKS, 20, seed=5)


def first(items, task, cond=lambda it: True):
    return next(it for it in items if it["task"] == task and cond(it))


def tagged(x):
    return f"<answer>{x}</answer>"


def wrong_number(item) -> str:
    """A wrong number that does not contain the gold one (the default scorer pays substrings partial credit)."""
    return next(str(n) for n in range(1000, 2000) if item["answer"] not in str(n))


# ----------------------------------------------------------------------------------------------- registry

def test_registry_matches_the_config_names():
    assert reward_names() == list(REWARD_NAMES) == list(REWARDS)
    assert all(callable(get_reward(n)) for n in REWARD_NAMES)


def test_unknown_names_and_bad_weights_name_the_setting():
    with pytest.raises(ValueError, match=r"'nope' in rl\.rewards; registered: correctness, format, partial, length"):
        get_reward("nope")
    with pytest.raises(ValueError, match=r"rl\.rewards"):
        combine(["correctness", "nope"], None)
    with pytest.raises(ValueError, match=r"rl\.rewards"):
        combine([], None)
    with pytest.raises(ValueError, match=r"rl\.reward_weights=\[1\.0\] has 1 weight\(s\) for 2 reward\(s\)"):
        combine(["correctness", "format"], [1.0])


# ----------------------------------------------------------------------------------------------- correctness

def test_correctness_is_domains_reward_fn_where_math_verify_has_nothing_to_add(items):
    completions = [f"work\n{tagged(it['answer'])}" for it in items] + ["<answer>zzz</answer>"] * len(items) \
        + ["the answer is 4"] * len(items)
    its = items * 3
    got = correctness(["p"] * len(its), completions, item=its)
    assert got == reward_fn(["p"] * len(its), completions, item=its)
    assert got[:len(items)] == [1.0] * len(items) and got[2 * len(items):] == [0.0] * len(items)
    # the item's own columns (entry, task) instead of whole items: the same rewards
    assert correctness(["p"] * len(its), completions, entry=[it["entry"] for it in its],
                       task=[it["task"] for it in its]) == got
    with pytest.raises(ValueError, match="entry"):
        correctness(["p"], ["x"], question=["q"])


def test_math_verify_accepts_equal_values_in_other_forms(items):
    assert math_equal("0.5", "1/2") and math_equal("0.5", "\\frac{1}{2}") and not math_equal("0.5", "1/3")

    dec = first(items, "decimal_chain_sum", lambda it: Fraction(it["answer"]).denominator > 1)
    frac = Fraction(dec["answer"])
    as_fraction, as_latex = f"{frac.numerator}/{frac.denominator}", f"\\frac{{{frac.numerator}}}{{{frac.denominator}}}"
    assert score(dec, as_fraction) == score(dec, as_latex) == 0.0  # the task's Decimal comparison rejects them
    wrong = f"{frac.numerator + 1}/{frac.denominator}"
    assert correctness(["p"] * 3, [tagged(as_fraction), tagged(as_latex), tagged(wrong)], item=[dec] * 3) \
        == [1.0, 1.0, 0.0]

    g = first(items, "gcd")
    assert 0 < score(g, f"{g['answer']}.0") < 1  # the default scorer's substring credit
    p = first(items, "products")
    assert correctness(["p"] * 3, [tagged(f"{g['answer']}.0"), tagged(f"${p['answer']}$"),
                                   tagged(wrong_number(p))], item=[g, p, p]) == [1.0, 1.0, 0.0]


def test_math_verify_does_not_pay_hedges_or_the_question_itself(items):
    p = first(items, "products")
    g = first(items, "gcd")
    hedge, listing = f"{wrong_number(p)} or {p['answer']}", " ".join([wrong_number(p), p["answer"]])
    question = p["entry"]["metadata"]["expression"]  # "77 * 24": math-verify evaluates it to the gold value
    assert math_equal(p["answer"], hedge) and math_equal(p["answer"], listing) and math_equal(p["answer"], question)
    answers = [hedge, listing, question, f"x = {g['answer']}"]
    its = [p, p, p, g]
    assert correctness(["p"] * 4, [tagged(a) for a in answers], item=its) == [score(i, a) for i, a in zip(its, answers)]
    assert all(score(i, a) < 1 for i, a in zip(its, answers))


def test_math_verify_is_not_used_where_the_form_is_the_task(items):
    fs = first(items, "fraction_simplification")
    num, den = fs["answer"].split("/")
    unsimplified = f"{int(num) * 2}/{int(den) * 2}"
    assert math_equal(fs["answer"], unsimplified)  # equal values, but not in lowest terms: the task's verdict stands
    assert correctness(["p"], [tagged(unsimplified)], item=[fs]) == [score(fs, unsimplified)] != [1.0]
    assert correctness(["p"], [tagged(fs["answer"])], item=[fs]) == [1.0]


def test_a_verifier_exception_costs_reward_not_the_step(items, monkeypatch):
    dec = first(items, "decimal_chain_sum", lambda it: Fraction(it["answer"]).denominator > 1)
    frac = Fraction(dec["answer"])

    def broken(*a, **k):
        raise RuntimeError("parser blew up")

    math_equal.cache_clear()
    monkeypatch.setattr(rewards, "parse", broken)
    assert correctness(["p"] * 2, [tagged(f"{frac.numerator}/{frac.denominator}"), tagged(dec["answer"])],
                       item=[dec] * 2) == [0.0, 1.0]
    math_equal.cache_clear()


# ----------------------------------------------------------------------------------------------- format

@pytest.mark.parametrize("text, expected", [
    ("3 x 4 = 12.\n<answer>12</answer>", 1.0),
    ("<answer>12</answer>\n", 1.0),
    ("<ANSWER>12</Answer>", 1.0),                  # tags case-insensitive, like extract_answer
    ("<answer>12", 0.0),                           # unclosed: extract_answer reads it, the format is not kept
    ("<answer>12</answer> because 3 x 4", 0.0),    # text after the answer
    ("<answer>1</answer> <answer>2</answer>", 0.0),  # more than one answer
    ("<answer> </answer>", 0.0),                   # empty
    ("\\boxed{12}", 0.0),                          # another convention
    ("12", 0.0),
])
def test_format(text, expected):
    assert format_reward(["p"], [text]) == [expected]
    assert format_reward(["p"], [[{"role": "assistant", "content": text}]]) == [expected]


def test_format_accepts_the_prompts_own_worked_answers():
    assert "<answer></answer>" in domains.INSTRUCTION
    shots = make_shots(TASKS, 1, seed=0)
    assert format_reward(["p"] * len(shots), [s["response"] for s in shots]) == [1.0] * len(shots)


# ----------------------------------------------------------------------------------------------- partial (ReFT)

def test_partial_is_refts_one_tenth_for_an_extracted_wrong_answer(items):
    g, dec = first(items, "gcd"), first(items, "decimal_chain_sum", lambda it: Fraction(it["answer"]).denominator > 1)
    frac = Fraction(dec["answer"])
    completions = [tagged(g["answer"]), tagged(wrong_number(g)), "<answer>no idea", "I think it is 4",
                   tagged(f"{frac.numerator}/{frac.denominator}")]
    assert partial(["p"] * 5, completions, item=[g, g, g, g, dec]) == [1.0, 0.1, 0.1, 0.0, 1.0]


# ----------------------------------------------------------------------------------------------- length

def test_length_levels_order_correct_answers_by_length_and_pay_wrong_ones_nothing(items):
    p = first(items, "products", lambda it: not it["answer"].startswith("-"))
    right, wrong = tagged(p["answer"]), tagged(wrong_number(p))
    n_tok = [5, 24, 36, 48, 72, 96, 500]
    got = length(["p"] * len(n_tok), [right] * len(n_tok), completion_ids=[[0] * n for n in n_tok], item=[p] * 7)
    # LENGTH_LEVELS = (24, 1.0), (48, 0.75), (96, 0.5), linear in between, flat outside
    assert LENGTH_LEVELS == ((24, 1.0), (48, 0.75), (96, 0.5))
    assert got == pytest.approx([1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.5])
    assert length(["p"], [wrong], completion_ids=[[0] * 5], item=[p]) == [0.0]

    # no completion_ids: words and punctuation marks stand in for tokens
    short, long_ = right, "step " * 60 + right  # <answer>56</answer> is 8 pieces (< answer > 56 < / answer >)
    got = length(["p"] * 3, [short, long_, "step " * 60 + wrong], item=[p] * 3)
    assert got == pytest.approx([1.0, 0.75 - 0.25 * (68 - 48) / 48, 0.0])
    assert got[0] > got[1] > got[2]


# ----------------------------------------------------------------------------------------------- combine

def test_combine_is_trls_weighted_nansum_and_logs_each_mean(items, monkeypatch):
    g = first(items, "gcd")
    completions = [tagged(g["answer"]),                       # correct, formatted
                   "so " + tagged(wrong_number(g)),           # wrong, formatted
                   "<answer>" + g["answer"],                  # correct, unclosed tag
                   "no idea"]                                 # nothing
    # an abstaining reward: no opinion on completions 0 and 3
    monkeypatch.setitem(REWARDS, "abstain", lambda prompts, completions, completion_ids=None, **kw:
                        [None, 2.0, 4.0, None])
    reward = combine(["correctness", "format", "partial", "abstain"], [1.0, 0.5, 2.0, 0.25])
    got = reward(prompts=["p"] * 4, completions=completions, completion_ids=None, item=[g] * 4)
    # per completion: 1*correctness + 0.5*format + 2*partial + 0.25*abstain, Nones skipped
    assert got == pytest.approx([1 + 0.5 + 2 * 1.0, 0 + 0.5 + 2 * 0.1 + 0.25 * 2, 1 + 0 + 2 * 1.0 + 0.25 * 4, 0.0])
    assert reward.last_means == pytest.approx({
        "rewards/correctness/mean": (1 + 0 + 1 + 0) / 4, "rewards/format/mean": (1 + 1 + 0 + 0) / 4,
        "rewards/partial/mean": (1 + 0.1 + 1 + 0) / 4, "rewards/abstain/mean": (2 + 4) / 2})

    # a completion every component abstains on is unscorable: None (TRL: NaN), and an all-None mean is NaN
    monkeypatch.setitem(REWARDS, "silent", lambda prompts, completions, **kw: [None] * len(completions))
    only = combine(["silent", "abstain"], None)
    assert only(["p"] * 4, completions, item=[g] * 4) == [None, 2.0, 4.0, None]
    assert math.isnan(only.last_means["rewards/silent/mean"]) and only.last_means["rewards/abstain/mean"] == 3.0


def test_combined_reward_defaults_to_unit_weights_and_pickles(items):
    its = items[:6]
    completions = [tagged(it["answer"]) for it in its]
    reward = combine(["correctness", "format"], None)
    assert reward(["p"] * 6, completions, item=its) == [2.0] * 6
    again = pickle.loads(pickle.dumps(reward))
    assert again(["p"] * 6, completions, item=its) == [2.0] * 6 and again.weights == [1.0, 1.0]
    with pytest.raises(ValueError, match="completions"):
        reward(["p"] * 6, completions, item=its[:3])
