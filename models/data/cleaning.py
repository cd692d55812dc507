"""MathClean-style rule filters over the teacher's responses (tasks/teacher.py), run after the verifier.

A row is one teacher sample that `teacher.keep` accepted: {"id", "domain", "question", "completion", "answer",
"score", "finished", "num_tokens"} (samples.jsonl's row plus its item's question). Each filter is a small function
named in FILTERS, the one registry `teacher.clean` picks from (mergekit-style: one explicit dict, no decorators):

    row filters    f(row) -> bool: True drops the row; they judge one response alone.
    set filters    f(rows) -> list[bool], one flag per row; they judge a response against the others (SET_FILTERS).

drop_reasons() runs the chosen filters in their order, each on the rows the earlier ones left, so a dropped row is
counted under the FIRST filter that drops it, and set filters compare only against rows still in the data. All of it
is deterministic: rows keep their order and ties go to the earlier row.

TeacherConfig (models/lm/config.py) checks `teacher.clean` against these names, kept there as CLEAN_FILTERS.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from branchmerge.models.training.rewards import follows_format

# repetition: a response whose word 4-grams are more than half repeats (of an earlier 4-gram in it) is a loop
REPETITION_NGRAM = 4
REPETITION_SHARE = 0.5
# near_duplicate_prompt: questions with the same numbers, in order, whose word 3-gram sets have a Jaccard similarity
# of at least 0.9. In maths another number is another problem, and Jaccard alone cannot see it: one changed number
# in a 60-word templated prompt still scores 0.9, and the pipeline's own short gcd / lcm prompts already reach 0.86
# with each other (measured on the default data's pools: max 0.71 arithmetic, 0.77 gcd, 0.86 lcm). A sign counts as
# part of a number only when written against it ("-3"), which can only keep more prompts apart.
NEAR_DUPLICATE_NGRAM = 3
NEAR_DUPLICATE_JACCARD = 0.9
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
WORD = re.compile(r"\d+(?:\.\d+)?|\w+|[^\w\s]")  # a number, a word, or one punctuation / operator character

Row = dict[str, Any]


# ----------------------------------------------------------------------------- row filters

def truncated(row: Row) -> bool:
    """Truncated: the response did not end on a stop token (it hit teacher.max_new_tokens, finished=false)."""
    return not row["finished"]


def no_answer(row: Row) -> bool:
    """No extractable answer: domains.extract_answer found none (answer=null)."""
    return row["answer"] is None


def wrong_format(row: Row) -> bool:
    """Wrong format: not exactly one <answer>...</answer> pair (case-insensitive tags), or nothing inside it, or text
    after it: the prompt asks for only the final answer inside <answer></answer> tags (the `format` reward's rule,
    rewards.follows_format), and SFT copies what it sees."""
    return not follows_format(row["completion"])


def repetition(row: Row) -> bool:
    """Degenerate repetition: more than REPETITION_SHARE (0.5) of the response's word REPETITION_NGRAM-grams (4,
    words split on whitespace) repeat a 4-gram seen earlier in it."""
    words = row["completion"].split()
    grams = [tuple(words[i:i + REPETITION_NGRAM]) for i in range(len(words) - REPETITION_NGRAM + 1)]
    return bool(grams) and (len(grams) - len(set(grams))) / len(grams) > REPETITION_SHARE


# ----------------------------------------------------------------------------- set filters

def normalized(text: str) -> str:
    return " ".join(text.split())


def duplicate(rows: list[Row]) -> list[bool]:
    """Duplicate responses: a response whose text, with runs of whitespace made one space and the ends stripped,
    equals an earlier response's to the same prompt (id); the first is kept."""
    seen: set[tuple[str, str]] = set()
    drops = []
    for row in rows:
        key = (row["id"], normalized(row["completion"]))
        drops.append(key in seen)
        seen.add(key)
    return drops


def shingles(question: str) -> frozenset[tuple[str, ...]]:
    """The question's word NEAR_DUPLICATE_NGRAM-grams, lowercased (a question shorter than that: one gram)."""
    words = WORD.findall(question.lower())
    n = min(NEAR_DUPLICATE_NGRAM, len(words))
    return frozenset(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def numbers(question: str) -> tuple[str, ...]:
    return tuple(NUMBER.findall(question))


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def near_duplicate_prompt(rows: list[Row]) -> list[bool]:
    """Near-duplicate prompts: every response to a prompt whose question has the same numbers, in the same order, as
    an earlier prompt's (first-seen order) that still has responses, and a word 3-gram Jaccard similarity of at least
    NEAR_DUPLICATE_JACCARD (0.9) with it (lowercased; numbers, words and punctuation are words); the first is kept."""
    kept: dict[tuple[str, ...], list[frozenset]] = {}  # numbers -> shingles of the kept prompts with those numbers
    dropped: dict[str, bool] = {}  # id -> its prompt is a near duplicate
    for row in rows:
        if row["id"] in dropped:
            continue
        grams = shingles(row["question"])
        same_numbers = kept.setdefault(numbers(row["question"]), [])
        dropped[row["id"]] = any(jaccard(g, grams) >= NEAR_DUPLICATE_JACCARD for g in same_numbers)
        if not dropped[row["id"]]:
            same_numbers.append(grams)
    return [dropped[row["id"]] for row in rows]


# ----------------------------------------------------------------------------- the registry

FILTERS: dict[str, Callable] = {
    "truncated": truncated,
    "no_answer": no_answer,
    "format": wrong_format,  # not `format`: that would shadow the builtin (as rewards.py's format reward)
    "repetition": repetition,
    "duplicate": duplicate,
    "near_duplicate_prompt": near_duplicate_prompt,
}
SET_FILTERS = frozenset({"duplicate", "near_duplicate_prompt"})
# The values the rules above use, named as in this module: the dataset card records them beside the filter list.
THRESHOLDS = {"REPETITION_NGRAM": REPETITION_NGRAM, "REPETITION_SHARE": REPETITION_SHARE,
              "NEAR_DUPLICATE_NGRAM": NEAR_DUPLICATE_NGRAM, "NEAR_DUPLICATE_JACCARD": NEAR_DUPLICATE_JACCARD}


def rule(name: str) -> str:
    """A filter's rule: its docstring on one line."""
    return " ".join(FILTERS[name].__doc__.split())


def drop_reasons(rows: list[Row], filters: list[str]) -> list[str | None]:
    """For each row, the first of `filters` (in order) that drops it, or None when it passes them all."""
    unknown = [name for name in filters if name not in FILTERS]
    if unknown:
        raise ValueError(f"unknown filter(s) {unknown}; known filters: {list(FILTERS)}")
    reasons: list[str | None] = [None] * len(rows)
    for name in filters:
        alive = [i for i, why in enumerate(reasons) if why is None]
        survivors = [rows[i] for i in alive]
        fn = FILTERS[name]
        drops = fn(survivors) if name in SET_FILTERS else [fn(row) for row in survivors]
        for i, drop in zip(alive, drops, strict=True):
            if drop:
                reasons[i] = name
    return reasons


def clean(rows: list[Row], filters: list[str]) -> tuple[list[Row], dict[str, int]]:
    """(the rows every filter keeps, in order; {filter: rows it dropped}, in filter order): drop_reasons counted."""
    reasons = drop_reasons(rows, filters)
    counts = {name: sum(why == name for why in reasons) for name in filters}
    return [row for row, why in zip(rows, reasons) if why is None], counts
