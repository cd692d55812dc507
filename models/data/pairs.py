"""Preference pairs for DPO (models/training/dpo.py; Light-R1's third stage) from verified samples.

A scored sample is {"id", "domain", "prompt" (chat messages), "response" (str), "correct" (bool)}: one response to
one prompt and whether the task's verifier accepted it. A pair is {"id", "domain", "prompt", "chosen", "rejected"}
(TRL DPOTrainer's conversational-prompt + plain-completion format): for one prompt, a verified response as chosen
and a failed one as rejected.

The choice is deterministic: samples are grouped by prompt id in the order the ids first appear; within a prompt,
chosen = the first correct response and rejected = the first wrong one, in sample order (the order the sampler
produced them: seeded, so a rerun picks the same pair). One pair per prompt; a prompt whose samples are all correct
or all wrong gives none (nothing to prefer). At most `max_pairs` pairs are kept, the first prompts' (prompt order).

Where the samples come from (DPOConfig.pairs_from):
    teacher_pairs(rows, prompts, max_pairs) the teacher stage's samples.jsonl rows (tasks/teacher.py):
                                          {"id", "domain", "completion", "answer", "score", "finished",
                                          "num_tokens"}; correct = score == 1.0 (the teacher's own "verified"
                                          rule). Those rows hold no prompt: `prompts` maps id -> chat messages
                                          (domains.build_messages(item, shots[domain]), the prompt the teacher
                                          answered); a row with its own "messages" (sft.jsonl's) uses those.
    policy_pairs(model, tokenizer, ...)   cfg.num_samples samples per item from the model being trained, with the
                                          pipeline's generation engine (generate_ids), scored by reward_fn
                                          (1.0 = correct): semi-on-policy pairs, as Light-R1.

pair_counts(pairs, n_prompts) summarises a pair set for the stage's artifact.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

# Rows the engine decodes at once when the policy samples its pairs: the eval stage's default batch (conf/eval),
# a good fit for the CPU engine. Fixed, not a setting: with the seed it fixes the samples, so a rerun gets the
# same pairs.
DECODE_ROWS = 64


def pairs_from_samples(samples: Iterable[Mapping[str, Any]], max_pairs: int | None) -> list[dict]:
    """Preference pairs from scored samples (module docstring: format and which responses are picked).

    samples: {"id", "domain", "prompt", "response", "correct"}, in sample order (a prompt's samples need not be
    adjacent). max_pairs: keep at most this many pairs, the first prompts' (None: all).
    """
    if max_pairs is not None and max_pairs < 0:
        raise ValueError(f"max_pairs={max_pairs} must be >= 0")
    groups: dict[str, dict] = {}  # id -> {"id", "domain", "prompt", "chosen", "rejected"}; dicts keep first-seen order
    for s in samples:
        g = groups.setdefault(s["id"], {"id": s["id"], "domain": s["domain"], "prompt": s["prompt"],
                                        "chosen": None, "rejected": None})
        if s["prompt"] != g["prompt"]:
            raise ValueError(f"prompt id {s['id']!r} comes with two different prompts")
        key = "chosen" if s["correct"] else "rejected"
        if g[key] is None:
            g[key] = s["response"]
    pairs = [g for g in groups.values() if g["chosen"] is not None and g["rejected"] is not None]
    return pairs if max_pairs is None else pairs[:max_pairs]


def pair_counts(pairs: list[dict], n_prompts: int) -> dict:
    """{"prompts": prompts offered, "pairs": pairs kept, "domains": {domain: pairs kept}, "without_pair": prompts
    that gave no kept pair (all samples correct, all wrong, or past max_pairs)}."""
    domains: dict[str, int] = {}
    for p in pairs:
        domains[p["domain"]] = domains.get(p["domain"], 0) + 1
    return {"prompts": n_prompts, "pairs": len(pairs), "domains": dict(sorted(domains.items())),
            "without_pair": n_prompts - len(pairs)}


def teacher_samples(teacher_rows: Iterable[Mapping[str, Any]],
                    prompts: Mapping[str, list[dict]] | None = None) -> list[dict]:
    """The teacher artifact's rows as scored samples: response = row["completion"], correct = row["score"] == 1.0,
    prompt = row["messages"] when the row has them, else prompts[row["id"]]."""
    out = []
    for row in teacher_rows:
        messages = row.get("messages")
        if messages is None:
            if prompts is None or row["id"] not in prompts:
                raise ValueError(f"teacher row {row['id']!r} has no 'messages' and no prompt was given for it: pass "
                                 "prompts={id: chat messages} (domains.build_messages(item, shots[domain]))")
            messages = prompts[row["id"]]
        out.append({"id": row["id"], "domain": row["domain"], "prompt": messages, "response": row["completion"],
                    "correct": row["score"] == 1.0})
    return out


def teacher_pairs(teacher_rows: Iterable[Mapping[str, Any]], prompts: Mapping[str, list[dict]] | None,
                  max_pairs: int | None) -> list[dict]:
    """Pairs from the teacher stage's samples.jsonl rows (module docstring): a verified teacher response as chosen,
    a failed one for the same prompt as rejected."""
    return pairs_from_samples(teacher_samples(teacher_rows, prompts), max_pairs)


def policy_samples(model, tokenizer, items: list[dict], build_messages: Callable[[dict], list[dict]],
                   reward_fn: Callable[..., list], cfg, seed: int, *, progress: bool = False) -> list[dict]:
    """cfg.num_samples samples per item from `model` (temperature cfg.temperature, no nucleus cut, at most
    cfg.max_new_tokens tokens), scored with reward_fn's TRL signature (GRPO's: prompts, completions, completion_ids,
    every item column); correct = reward == 1.0, a None reward (no opinion) drops the sample. Returns scored samples
    grouped by item, in item order."""
    from branchmerge.models.lm.chat import stop_token_ids
    from branchmerge.models.lm.generation import completion, generate_ids, prompt_ids

    if not items:
        return []
    messages = [build_messages(it) for it in items]
    n = cfg.num_samples
    was_training = model.training
    model.eval()
    try:
        ids = generate_ids(model, tokenizer, prompt_ids(tokenizer, messages), n=n, temperature=cfg.temperature,
                           top_p=1.0, max_new_tokens=cfg.max_new_tokens, batch_size=DECODE_ROWS, seed=seed,
                           desc="dpo pairs", progress=progress)
    finally:
        model.train(was_training)
    stops = set(stop_token_ids(tokenizer, model.generation_config))
    rows = [c for per_item in ids for c in per_item]
    texts = [completion(tokenizer, c, stops)["text"] for c in rows]
    columns = {k: [it[k] for it in items for _ in range(n)] for k in items[0]}
    rewards = reward_fn(prompts=[m for m in messages for _ in range(n)], completions=texts, completion_ids=rows,
                        **columns)
    if len(rewards) != len(texts):
        raise ValueError(f"reward_fn returned {len(rewards)} rewards for {len(texts)} completions")
    return [{"id": items[i // n]["id"], "domain": items[i // n]["domain"], "prompt": messages[i // n],
             "response": text, "correct": float(r) == 1.0}
            for i, (text, r) in enumerate(zip(texts, rewards)) if r is not None]


def policy_pairs(model, tokenizer, items: list[dict], build_messages: Callable[[dict], list[dict]],
                 reward_fn: Callable[..., list], cfg, seed: int, *, progress: bool = False) -> list[dict]:
    """Semi-on-policy pairs (Light-R1): policy_samples, then pairs_from_samples capped at cfg.max_pairs."""
    samples = policy_samples(model, tokenizer, items, build_messages, reward_fn, cfg, seed, progress=progress)
    return pairs_from_samples(samples, cfg.max_pairs)
