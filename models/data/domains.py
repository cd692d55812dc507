"""reasoning-gym domains: items, few-shot prompts, answer extraction and scoring.

A domain is a list of task specs {name, weight, config}: `name` is a reasoning-gym dataset, `config`
its dataset kwargs (difficulty), `weight` its share of the domain's items.

An item is {"id", "domain", "task", "question", "answer", "entry"}; `entry` is the reasoning-gym
entry made JSON-safe, plus entry["task_config"] (the spec's config) so score() can rebuild the
dataset exactly as generated: a few score_answer methods read self.config (decimal_arithmetic,
time_intervals, polynomial_equations, puzzle24).
"""

import hashlib
import json
import logging
import math
import random
import re
from functools import lru_cache

import reasoning_gym

log = logging.getLogger(__name__)

INSTRUCTION = ("Solve the problem. Think briefly, then give only the final answer "
               "inside <answer></answer> tags.")
MAX_DRAWS_PER_ITEM = 20  # dedupe can exhaust a small problem space; stop drawing after this many tries


# ----------------------------------------------------------------------------- items

def stable_int(*parts) -> int:
    """A seed derived from parts that does not depend on PYTHONHASHSEED."""
    return int(hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:8], 16)


def json_safe(x):
    """reasoning-gym entries hold tuples, sets, Fractions, numpy values...: make them JSON values."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (set, frozenset)):
        return sorted((json_safe(v) for v in x), key=repr)
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if hasattr(x, "tolist"):  # numpy arrays and scalars
        return json_safe(x.tolist())
    return str(x)  # Fraction, Decimal, sympy, ...


def task_counts(tasks: list[dict], size: int) -> list[int]:
    """Split size over tasks by weight (largest remainder, so the counts add up to size)."""
    weights = [float(t.get("weight", 1.0)) for t in tasks]
    if not tasks or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"tasks need at least one entry with a positive weight (got {tasks!r})")
    exact = [size * w / sum(weights) for w in weights]
    counts = [int(e) for e in exact]
    by_remainder = sorted(range(len(tasks)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[:size - sum(counts)]:
        counts[i] += 1
    return counts


def task_dataset(name: str, config: dict, seed: int, size: int):
    if name not in reasoning_gym.factory.DATASETS:
        raise ValueError(f"task name={name!r} is not a reasoning-gym dataset; "
                         f"known: {sorted(reasoning_gym.factory.DATASETS)}")
    return reasoning_gym.create_dataset(name, seed=seed, size=size, **config)


def item_id(domain: str, task: str, question: str) -> str:
    """Content-addressed id: stable across runs and pool sizes, unique once questions are deduped."""
    return f"{domain}/{task}/{hashlib.sha1(question.encode()).hexdigest()[:12]}"


def make_item(domain: str, task: dict, entry: dict) -> dict:
    entry = json_safe(entry)
    entry["task_config"] = json_safe(dict(task.get("config") or {}))
    return {"id": item_id(domain, task["name"], entry["question"]), "domain": domain, "task": task["name"],
            "question": entry["question"], "answer": str(entry["answer"]), "entry": entry}


def task_entries(task: dict, count: int, seed: int, seen: set[str]):
    """Up to count entries with questions not in `seen` (which is updated)."""
    draws = count * MAX_DRAWS_PER_ITEM + 10
    ds = task_dataset(task["name"], dict(task.get("config") or {}), seed, draws)
    got = 0
    for idx in range(draws):
        if got == count:
            break
        entry = ds[idx]
        if entry["question"] in seen:
            continue
        seen.add(entry["question"])
        got += 1
        yield entry
    if got < count:
        log.warning("task %s gave only %d unique questions of %d asked (small problem space)",
                    task["name"], got, count)


def build_items(domain: str, tasks: list[dict], size: int, seed: int) -> list[dict]:
    """size items for a domain, split over its tasks by weight, deduped by question, shuffled
    (seeded) so tasks interleave."""
    seen: set[str] = set()
    items = []
    for task, count in zip(tasks, task_counts(tasks, size)):
        task_seed = stable_int("pool", seed, domain, task["name"])
        items += [make_item(domain, task, e) for e in task_entries(task, count, task_seed, seen)]
    random.Random(stable_int("shuffle", seed, domain)).shuffle(items)
    return items


def split_items(items: list[dict], eval_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval): eval_size items held out; a question never lands on both sides."""
    by_question: dict[str, list[dict]] = {}
    for it in items:
        by_question.setdefault(it["question"], []).append(it)
    questions = sorted(by_question)
    random.Random(stable_int("split", seed)).shuffle(questions)
    eval_q = set(questions[:eval_size])
    train = [it for it in items if it["question"] not in eval_q]
    evals = [it for it in items if it["question"] in eval_q]
    return train, evals


# ----------------------------------------------------------------------------- few-shot prompts

def worked_reasoning(task: str, entry: dict) -> str:
    """One or two lines of worked reasoning for a shot (task-specific where we know the task;
    the shot only has to show the format and a short, correct line of thought)."""
    m, ans = entry.get("metadata", {}), entry["answer"]
    if task == "leg_counting":
        from reasoning_gym.arithmetic.leg_counting import ANIMALS
        terms = [f"{n} {a} x {ANIMALS[a]} = {n * ANIMALS[a]}" for a, n in m["animals"].items()]
        return "; ".join(terms) + f". Total: {ans}."
    if task == "gcd" and len(m.get("numbers", [])) == 2:
        a, b = sorted(m["numbers"], reverse=True)  # larger first: no wasted "a mod b = a" step
        steps = []
        while b:
            steps.append(f"{a} mod {b} = {a % b}")
            a, b = b, a % b
        return "Euclid: " + ", ".join(steps) + f". GCD = {ans}."
    if task == "lcm" and len(m.get("numbers", [])) == 2:
        a, b = m["numbers"]
        return f"GCD({a}, {b}) = {math.gcd(a, b)}, so LCM = {a} x {b} / {math.gcd(a, b)} = {ans}."
    if task in ("chain_sum", "decimal_chain_sum", "basic_arithmetic") and "expression" in m:
        return f"{m['expression']} = {ans}."
    if task == "coin_flip":
        n, k, r = m["num_trials"], m["k_heads"], m["rational"]
        kind = f"C({n}, {k})" if m["problem_type"] == "exact" else f"sum of C({n}, i) for i >= {k}"
        return f"{kind} = {r['numerator']} outcomes of 2^{n} = {r['denominator']}, so {r['numerator']}/{r['denominator']} = {ans}."
    if task == "number_sorting":
        return f"In {m['direction']} order the numbers are {', '.join(m['sorted_numbers'])}."
    if task == "word_sequence_reversal":
        return f"Reading the list from the end: {ans}."
    if task == "letter_counting":
        letter = m["target_letter"]
        counts = [f"{w}: {w.lower().count(letter)}" for w in m["span"] if letter in w.lower()]
        return f"Counting '{letter}': " + ", ".join(counts) + f". Total: {ans}."
    return f"The answer is {ans}."


def worked_response(task: str, entry: dict) -> str:
    return f"{worked_reasoning(task, entry)}\n<answer>{entry['answer']}</answer>"


def gold_example(item: dict, shots: list[dict]) -> dict:
    """An SFT-shaped example of a prompt with its gold answer worked (worked_response): what the dev split is
    scored on by loss (CLIMB's proxy runs, Aioli's per-group losses), since no teacher answered those prompts."""
    return {"id": item["id"], "domain": item["domain"], "messages": build_messages(item, shots),
            "completion": worked_response(item["task"], item["entry"])}


def dev_examples(dev_items: list[dict], shots: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """The dev split as gold examples per domain (gold_example): what CLIMB's proxies and Aioli are scored on."""
    out: dict[str, list[dict]] = {}
    for it in dev_items:
        out.setdefault(it["domain"], []).append(gold_example(it, shots[it["domain"]]))
    return out


def make_shots(tasks: list[dict], k: int, seed: int, exclude: frozenset[str] | set[str] = frozenset()) -> list[dict]:
    """k worked examples per task, {"task", "question", "answer", "response", "entry"}, drawn with a seed
    stream disjoint from build_items' ("shots" vs "pool"); pass the pool's questions as `exclude`
    to also rule out a shot repeating a pool question in small problem spaces (when that leaves
    fewer than k, the rest are drawn ignoring `exclude`)."""
    shots = []
    for task in tasks:
        shot_seed = stable_int("shots", seed, task["name"])
        entries = list(task_entries(task, k, shot_seed, set(exclude)))
        if len(entries) < k:  # the pool took the whole problem space: a repeated question beats no example
            entries += list(task_entries(task, k - len(entries), shot_seed, {e["question"] for e in entries}))
        for e in entries:
            e = json_safe(e)
            shots.append({"task": task["name"], "question": e["question"], "answer": str(e["answer"]),
                          "response": worked_response(task["name"], e), "entry": e})
    return shots


def user_turn(question: str) -> dict:
    return {"role": "user", "content": f"{INSTRUCTION}\n\n{question.strip()}"}


def build_messages(item: dict, shots: list[dict]) -> list[dict]:
    """The chat prompt: each shot as an earlier user/assistant turn, then the question.
    (SmolLM2-135M ignores format instructions in the system prompt or after the question but copies
    a worked previous turn: environment.md.) Shots of the item's own task are used when there are
    any, else all shots."""
    own = [s for s in shots if s["task"] == item["task"]] or shots
    messages = []
    for s in own:
        messages += [user_turn(s["question"]), {"role": "assistant", "content": s["response"]}]
    return messages + [user_turn(item["question"])]


# ----------------------------------------------------------------------------- answers and rewards

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
OPEN_TAG = re.compile(r"<answer>", re.IGNORECASE)


def boxed_contents(text: str) -> str | None:
    """Contents of the last \\boxed{...}, with nested braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def extract_answer(text: str | None) -> str | None:
    """The final answer in a completion, or None. In order:
    1. the last <answer>...</answer> with non-empty contents (tags case-insensitive), stripped;
       a \\boxed{x} inside it is unwrapped to x;
    2. an unclosed final <answer> (truncated or the model forgot the closing tag): its first
       non-empty line;
    3. the last \\boxed{...} anywhere (math-style models);
    4. None. No free-text guessing: a reward must not pay for an answer the model never marked."""
    if not text:
        return None
    closed = [m.group(1).strip() for m in ANSWER_TAG.finditer(text)]
    closed = [c for c in closed if c]
    last_open = None
    for m in OPEN_TAG.finditer(text):
        last_open = m
    tail_unclosed = last_open is not None and "</answer>" not in text[last_open.end():].lower()
    if tail_unclosed:
        lines = [ln.strip() for ln in text[last_open.end():].splitlines() if ln.strip()]
        if lines:
            return boxed_contents(lines[0]) or lines[0]
    if closed:
        return boxed_contents(closed[-1]) or closed[-1]
    return boxed_contents(text)


@lru_cache(maxsize=256)
def scorer(task: str, config_json: str):
    """The task's own score_answer, from a dataset built with the item's config."""
    if config_json == "null":
        return reasoning_gym.get_score_answer_fn(task)
    return task_dataset(task, json.loads(config_json), seed=0, size=1).score_answer


def score(item: dict, answer: str | None) -> float:
    """The task's score_answer for an extracted answer (usually 1.0 / 0.0; some tasks give partial
    credit); 0.0 when no answer was extracted."""
    if answer is None:
        return 0.0
    entry = item["entry"]
    task = entry.get("metadata", {}).get("source_dataset", item.get("task"))
    config = json.dumps(entry.get("task_config"), sort_keys=True)
    try:
        return float(scorer(task, config)(answer, entry))
    except Exception as e:  # a malformed answer must cost reward, never crash a training step
        log.debug("score_answer(%s) raised %r on %r", task, e, answer)
        return 0.0


def completion_text(completion) -> str:
    """TRL passes plain strings or, for chat data, [{"role": "assistant", "content": ...}]."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion if isinstance(m, dict))


def reward_fn(prompts, completions, **columns) -> list[float]:
    """TRL reward signature. TRL passes every dataset column as a keyword list aligned with
    completions; the items must reach us one of two ways: an `item` column (whole item dicts), or
    the item's own columns (at least `entry`, optionally `task`). Reward = score(extract_answer)."""
    if "item" in columns:
        items = columns["item"]
    elif "entry" in columns:
        tasks = columns.get("task") or [None] * len(completions)
        items = [{"entry": e, "task": t} for e, t in zip(columns["entry"], tasks)]
    else:
        raise ValueError(f"reward_fn needs an 'item' or 'entry' column; got columns {sorted(columns)}")
    return [score(it, extract_answer(completion_text(c))) for it, c in zip(items, completions)]
