"""Which reasoning-gym task settings give a teacher signal (pass@n in 20-90%) and leave the student room?

For each candidate task: the teacher's pass@n (temperature sampling) and the student's greedy pass@1 on the
same prompts, with the pipeline's own prompt template, generation and verifier. Also the teacher's speed and
verified responses per minute, the number that picks the default teacher.

    .venv/bin/python bench/domain_signal.py --model smollm2 --prompts 16 --n 4
    .venv/bin/python bench/domain_signal.py --model qwen_coder --tasks chain_sum,leg_counting
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spin-waiting OpenMP threads collapse on a shared CPU
ROOT = Path(__file__).resolve().parent.parent

CANDIDATES = {
    "chain_sum": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
    "basic_arithmetic": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
    "leg_counting": {"min_animals": 1, "max_animals": 2, "max_instances": 2},
    "letter_counting": {"min_words": 3, "max_words": 5},
    "gcd": {"min_numbers": 2, "max_numbers": 2, "min_value": 2, "max_value": 20},
    "lcm": {"min_numbers": 2, "max_numbers": 2, "min_value": 2, "max_value": 10},
    "spell_backward": {"min_word_len": 3, "max_word_len": 4},
    "word_sequence_reversal": {"min_words": 2, "max_words": 3},
    "decimal_chain_sum": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1,
                          "min_decimal_places": 1, "max_decimal_places": 1},
}


def candidate(spec: str) -> tuple[str, dict]:
    """`name` (a config above) or `label=name:{json config}` for a setting not listed."""
    label, _, rest = spec.partition("=")
    if not rest:
        return label, CANDIDATES[label]
    name, _, config = rest.partition(":")
    return label, {"__task__": name, **json.loads(config or "{}")}


def model_folder(name: str, dtype: str) -> str:
    from branchmerge.models.lm.hf import materialize_model

    spec = yaml.safe_load((ROOT / "conf/teacher" / f"{name}.yaml").read_text())["model"]
    out = Path(os.environ.get("BRANCHMERGE_CACHE", Path.home() / ".cache/branchmerge")) / "bench" / f"{name}-{dtype}"
    if not (out / "config.json").exists():
        materialize_model(spec["source"], out, dtype)
    return str(out)


def main() -> None:
    from branchmerge.models.data import domains
    from branchmerge.models.eval.metrics import pass_at_k
    from branchmerge.models.lm import generation
    from branchmerge.models.lm.hf import load_model, load_tokenizer

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2", help="a conf/teacher/ name")
    p.add_argument("--tasks", default=",".join(CANDIDATES), help="comma list of names, or label=task:{json} (use ;)")
    p.add_argument("--k", type=int, default=4, help="report the unbiased pass@k from the n samples")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--greedy", action="store_true", help="also greedy pass@1 (the student's view)")
    args = p.parse_args()
    folder = model_folder(args.model, "bfloat16")
    model, tok = load_model(folder, "bfloat16"), load_tokenizer(folder)
    rows = []
    for spec in args.tasks.split(";" if ";" in args.tasks else ","):
        name, config = candidate(spec)
        task_name = config.pop("__task__", name)
        tasks = [{"name": task_name, "weight": 1.0, "config": config}]
        items = domains.build_items(name, tasks, size=args.prompts, seed=0)
        shots = domains.make_shots(tasks, k=1, seed=10_000)
        convs = [domains.build_messages(it, shots) for it in items]
        t0 = time.perf_counter()
        samples = generation.generate(model, tok, convs, n=args.n, temperature=args.temperature, top_p=0.95,
                                      max_new_tokens=args.max_new_tokens, batch_size=16, seed=0, desc=name)
        minutes = (time.perf_counter() - t0) / 60
        scores = [[domains.score(it, domains.extract_answer(c["text"])) for c in cs] for it, cs in zip(items, samples)]
        tokens = sum(c["num_tokens"] for cs in samples for c in cs)
        row = {"task": name, "config": config, f"pass@{args.n}": sum(max(s) for s in scores) / len(items),
               f"pass@{args.k}": sum(pass_at_k(args.n, sum(s == 1.0 for s in r), args.k) for r in scores) / len(items),
               "sample_acc": sum(map(sum, scores)) / (len(items) * args.n),
               "verified_per_min": sum(map(sum, scores)) / minutes, "tok_per_s": tokens / (minutes * 60)}
        if args.greedy:
            greedy = generation.generate(model, tok, convs, n=1, temperature=0.0, top_p=1.0,
                                         max_new_tokens=args.max_new_tokens, batch_size=16, seed=0, desc=f"{name} greedy")
            row["greedy@1"] = sum(domains.score(it, domains.extract_answer(c[0]["text"]))
                                  for it, c in zip(items, greedy)) / len(items)
        rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()
