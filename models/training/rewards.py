"""Reward functions for RL (GRPO), by registry name, and their weighted combination.

Every reward has TRL's reward-function signature,

    fn(prompts, completions, completion_ids=None, **columns) -> list[float | None]

one value per completion (None = "no opinion"). `columns` are the dataset columns as GRPOModule.score and TRL
pass them, repeated per completion: either an `item` column of item dicts or the item's own columns (at least
`entry`, optionally `task`), exactly as models/data/domains.reward_fn reads them.

    correctness  the task's own verifier: reasoning-gym score_answer on the extracted answer (domains.score),
                 with math-verify as a fallback for number-valued items (see math_equal)
    format       1.0 when the answer is given the way the prompt asks (domains.INSTRUCTION), else 0.0
    partial      ReFT's reward: 1.0 correct, 0.1 answer extracted but wrong, 0.0 no answer
    length       correctness scaled by a TLDR-style length factor with budget levels (our approximation)

REWARDS is the one registry (an explicit dict: nothing registers itself on import); rl.rewards names entries of
it and config.REWARD_NAMES must list the same names (a test checks). combine(names, weights) builds the reward
the trainer calls: TRL GRPOTrainer's aggregation (see CombinedReward), with each component's batch mean kept
for logging under TRL's metric names. Everything here is a plain module-level function or a small class: it
pickles, and importing it loads no model.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from functools import lru_cache
from itertools import pairwise

from branchmerge.models.data.domains import completion_text, extract_answer, score
from math_verify import parse, verify

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- reading the batch

def column_items(n: int, columns: dict) -> list[dict]:
    """The item of each completion from TRL's keyword columns (the same two ways domains.reward_fn accepts)."""
    if "item" in columns:
        items = list(columns["item"])
    elif "entry" in columns:
        tasks = columns.get("task") or [None] * len(columns["entry"])
        items = [{"entry": e, "task": t, "answer": str(e.get("answer"))} for e, t in zip(columns["entry"], tasks)]
    else:
        raise ValueError(f"rewards need an 'item' or 'entry' column; got columns {sorted(columns)}")
    if len(items) != n:
        raise ValueError(f"{len(items)} items for {n} completions: columns must be repeated per completion")
    return items


def gold_answer(item: dict) -> str:
    return str(item.get("answer", item["entry"].get("answer")))


def item_task(item: dict) -> str | None:
    return item["entry"].get("metadata", {}).get("source_dataset", item.get("task"))


# ----------------------------------------------------------------------------- math-verify fallback

# Items whose gold answer is a plain number (integer, decimal or fraction, optionally signed): the arithmetic
# domains (products, decimal_chain_sum, chain_sum, gcd, lcm, coin_flip, counts...). Their score_answer compares
# strings or Decimals, so a right number in another notation earns nothing or only the default scorer's
# substring credit: "17/2" or "\frac{17}{2}" for 8.5, "$12$" or "12.0" for 12 (1/3 credit). math-verify parses
# both sides (LaTeX or plain, via sympy) and compares values, so those count as correct.
NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
NUMBER_GOLD = re.compile(rf"{NUMBER}(?:\s*/\s*\d+)?")
# ...and only for an answer that is itself ONE number in some notation: math-verify reads the last expression
# of a hedge ("13 or 12", "1 2 3 ... 12" both verify as 12) and evaluates expressions ("7 * 8" is 56: the
# products question itself), which would pay for not answering. Allowed: a number, a/b, \frac{a}{b} (also
# \dfrac, \tfrac), optionally inside $...$, \(...\) or \[...\].
NUMBER_ANSWER = re.compile(rf"(?:\$|\\\(|\\\[)?\s*(?:{NUMBER}(?:\s*/\s*{NUMBER})?"
                           rf"|[-+]?\\[dt]?frac\{{\s*{NUMBER}\s*\}}\{{\s*{NUMBER}\s*\}})\s*(?:\$|\\\)|\\\])?")
# Tasks whose point is the answer's form, not its value: 6/8 equals 3/4 but is not "simplified".
EXACT_FORM_TASKS = frozenset({"fraction_simplification"})
MATH_ANSWER_MAX_CHARS = 64    # a cap on what reaches sympy (see math_equal)
MATH_VERIFY_TIMEOUT_S = 5     # math-verify's own per-call limit (signal.alarm: main thread only, see math_equal)


def uses_math_verify(item: dict, answer: str) -> bool:
    return (item_task(item) not in EXACT_FORM_TASKS and NUMBER_GOLD.fullmatch(gold_answer(item).strip()) is not None
            and NUMBER_ANSWER.fullmatch(answer) is not None)


def _no_timeout_warning() -> None:
    """math-verify warns once per process, at WARNING, when it runs without its signal-based timeout: here that
    is deliberate off the main thread (math_equal's docstring), so the warning would only be noise in the run's
    terminal. Its modules keep the "already shown" flag as a global."""
    import math_verify.grader
    import math_verify.parser

    math_verify.grader.TIMEOUT_WARNING_SHOWN = math_verify.parser.TIMEOUT_WARNING_SHOWN = True


@lru_cache(maxsize=4096)
def math_equal(gold: str, answer: str) -> bool:
    """math-verify: does `answer` have the value of `gold`? False on anything it cannot parse, and on any error
    (a verifier exception costs reward, never a training step). math-verify's timeout uses signal.alarm, which
    only works in the main thread; elsewhere it runs without one (answers are capped at MATH_ANSWER_MAX_CHARS)."""
    if len(answer) > MATH_ANSWER_MAX_CHARS:
        return False
    timeout = MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    if timeout is None:
        _no_timeout_warning()
    try:
        # No fallback to raw string matches: a prediction math-verify cannot parse is simply not equal.
        pred = parse(answer, fallback_mode="no_fallback", parsing_timeout=timeout)
        return bool(pred) and verify(parse(gold, parsing_timeout=timeout), pred, timeout_seconds=timeout)
    except Exception as e:  # sympy can raise almost anything on odd input: no reward, no crash
        log.debug("math-verify raised %r on gold=%r answer=%r", e, gold, answer)
        return False


def correctness_score(item: dict, answer: str | None) -> float:
    """domains.score (the task's score_answer), raised to 1.0 when math-verify finds a number-valued item's
    answer, a single number, equal to the gold one (only ever raises: the task's own verdict is never lowered)."""
    s = score(item, answer)
    if s < 1.0 and answer is not None and uses_math_verify(item, answer.strip()) \
            and math_equal(gold_answer(item), answer.strip()):
        return 1.0
    return s


def scored(completions, columns) -> list[tuple[str, str | None, float]]:
    """(text, extracted answer, correctness) per completion: what every reward below starts from."""
    items = column_items(len(completions), columns)
    out = []
    for item, c in zip(items, completions):
        text = completion_text(c)
        answer = extract_answer(text)
        out.append((text, answer, correctness_score(item, answer)))
    return out


# ----------------------------------------------------------------------------- the rewards

def correctness(prompts, completions, completion_ids=None, **columns) -> list[float | None]:
    """The task's own verifier: reasoning-gym score_answer on the extracted answer (domains.reward_fn's
    semantics, so usually 1.0 / 0.0, some tasks give partial credit; 0.0 when no answer was extracted), with
    math-verify's value comparison as a fallback for number-valued items when score_answer gives less than 1."""
    return [s for _, _, s in scored(completions, columns)]


# The prompt asks for "only the final answer inside <answer></answer> tags" (domains.INSTRUCTION, and the
# worked shot ends that way): one closed tag pair with something in it, and nothing after it.
TAG = re.compile(r"</?answer>", re.IGNORECASE)


def follows_format(text: str) -> bool:
    tags = [m.group(0).lower() for m in TAG.finditer(text)]
    if tags != ["<answer>", "</answer>"]:
        return False
    m = re.search(r"<answer>(.*?)</answer>(.*)\Z", text, re.DOTALL | re.IGNORECASE)
    return bool(m.group(1).strip()) and not m.group(2).strip()


def format_reward(prompts, completions, completion_ids=None, **columns) -> list[float | None]:
    """1.0 when the completion gives its answer in the requested form, else 0.0: exactly one
    <answer>...</answer> pair (case-insensitive tags), non-empty inside, nothing but whitespace after it.
    Reasoning before the tags is allowed (the prompt asks to "think briefly, then" answer). Stricter than
    extract_answer, which also reads an unclosed tag or a \\boxed{}: those earn correctness but not format."""
    return [1.0 if follows_format(completion_text(c)) else 0.0 for c in completions]


PARTIAL_CORRECT, PARTIAL_WRONG, PARTIAL_NONE = 1.0, 0.1, 0.0


def partial(prompts, completions, completion_ids=None, **columns) -> list[float | None]:
    """ReFT's reward (Luong et al., "ReFT: Reasoning with Reinforced Fine-Tuning", ACL 2024, arXiv:2401.08967):
    r = 1 if EXTRACT(y) equals the gold answer, 0.1 if an answer could be extracted but is wrong, 0 if none
    could be extracted; the 0.1 "partial reward" eases the sparse-reward problem by paying for a
    well-formed final answer. Here EXTRACT = domains.extract_answer and "equals" = correctness == 1.0 (full
    credit; the task's partial credit counts as wrong, as ReFT's rule is binary)."""
    out = []
    for _, answer, s in scored(completions, columns):
        out.append(PARTIAL_NONE if answer is None else PARTIAL_CORRECT if s >= 1.0 else PARTIAL_WRONG)
    return out


# Budget levels (tokens of the completion) and the length factor at each; linear in between, flat outside.
# short: a System-1 answer, about the length of our worked shots (one line of working, then the tag): full
#        reward, no pressure to cut below it (cutting that line would cost accuracy, not save redundancy).
# medium: the default rl.max_new_tokens (48), where GRPO completions are cut off.
# long: a System-2 chain of thought; anything longer is paid the same floor: a long correct answer still beats
#       any wrong one (factor > 0), which keeps long reasoning where short reasoning fails.
LENGTH_LEVELS = ((24, 1.0), (48, 0.75), (96, 0.5))
WORD = re.compile(r"\w+|[^\w\s]")  # tokenizer-free count: words and single punctuation marks ("3.4" = 3 pieces)


def length_factor(n_tokens: int) -> float:
    """LENGTH_LEVELS interpolated: 1.0 up to the short budget, then down linearly through each level."""
    (n0, f0) = LENGTH_LEVELS[0]
    if n_tokens <= n0:
        return f0
    for (lo, f_lo), (hi, f_hi) in pairwise(LENGTH_LEVELS):
        if n_tokens <= hi:
            return f_lo + (f_hi - f_lo) * (n_tokens - lo) / (hi - lo)
    return LENGTH_LEVELS[-1][1]


def completion_length(text: str, ids) -> int:
    """Tokens when the trainer passed completion_ids, else WORD pieces of the text (a tokenizer-free stand-in
    for tokens, close to them on arithmetic text where tokenizers split digits and punctuation)."""
    return len(ids) if ids is not None else len(WORD.findall(text))


def length(prompts, completions, completion_ids=None, **columns) -> list[float | None]:
    """Length-regularised correctness with budget levels: correctness x length_factor(completion length), so a
    wrong answer gets 0 and, among correct ones, a shorter completion gets more (flat within the short budget).

    This is OUR APPROXIMATION of TLDR ("Too Long, Do Re-weighting for Efficient LLM Reasoning Compression",
    Li et al., arXiv:2506.02678), not the paper's method. TLDR does not shape a reward: it fine-tunes on a
    mixture of short-CoT (System-1) and long-CoT (System-2) data and re-weights the mixture ratio during
    training, from how far the model is from a short model's length (efficiency bound) and a long model's
    accuracy (accuracy bound). Here the two regimes become fixed budget levels (LENGTH_LEVELS) in a per-
    completion reward, and the "dynamic ratio" is left to GRPO's group-relative advantages: in a group with
    both short and long correct completions the short ones win (efficiency), in a group where only long
    completions are correct those still beat the wrong ones (accuracy). No dev-set bounds, no re-weighting."""
    ids = completion_ids if completion_ids is not None else [None] * len(completions)
    return [s * length_factor(completion_length(text, i)) for (text, _, s), i in zip(scored(completions, columns), ids)]


# ----------------------------------------------------------------------------- registry and combination

REWARDS = {
    "correctness": correctness,
    "format": format_reward,  # not `format`: that would shadow the builtin
    "partial": partial,
    "length": length,
}


def reward_names() -> list[str]:
    return list(REWARDS)


def get_reward(name: str):
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r} in rl.rewards; registered: {', '.join(REWARDS)}")
    return REWARDS[name]


class CombinedReward:
    """The weighted sum of named rewards, itself a TRL-signature reward function, aggregated as TRL's
    GRPOTrainer does (_calculate_rewards, then sum_then_normalize in _generate_and_score_completions): each
    reward's None becomes NaN, the reward of a completion is nansum_i(weight_i * reward_i), i.e. components
    with no opinion are skipped, and a completion every component returned None for is unscorable: None here
    (TRL: NaN, left out of the baseline, advantage 0; GRPOModule.score maps None to NaN the same way).

    After each call `last_means` holds each component's nanmean over the batch (NaN when it had no opinion on
    any completion) under TRL's metric names, `rewards/<name>/mean`, for the trainer to log."""

    def __init__(self, names: list[str], weights: list[float] | None):
        names = list(names)
        if not names:
            raise ValueError("rl.rewards is empty: name at least one reward; registered: " + ", ".join(REWARDS))
        self.fns = [get_reward(n) for n in names]
        if weights is None:
            weights = [1.0] * len(names)
        if len(weights) != len(names):
            raise ValueError(f"rl.reward_weights={list(weights)} has {len(weights)} weight(s) for {len(names)} "
                             f"reward(s) rl.rewards={names}")
        self.names, self.weights = names, [float(w) for w in weights]
        self.__name__ = "+".join(names)  # TRL names a reward function by __name__ in its logs
        self.last_means: dict[str, float] = {}

    def __call__(self, prompts, completions, completion_ids=None, **columns) -> list[float | None]:
        per_fn = []
        for name, fn in zip(self.names, self.fns):
            values = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
            if len(values) != len(completions):
                raise ValueError(f"reward {name!r} returned {len(values)} values for {len(completions)} completions")
            per_fn.append([math.nan if v is None else float(v) for v in values])
        self.last_means = {f"rewards/{name}/mean": nanmean(values) for name, values in zip(self.names, per_fn)}
        out = []
        for row in zip(*per_fn):
            terms = [w * v for w, v in zip(self.weights, row) if not math.isnan(v)]
            out.append(sum(terms) if terms else None)
        return out


def nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def combine(names: list[str], weights: list[float] | None) -> CombinedReward:
    """rl.rewards / rl.reward_weights -> the reward function GRPO calls (weights None: 1 each)."""
    return CombinedReward(names, weights)
