"""Our generation engine (models/lm/generation.py) vs transformers' `model.generate`, same run, same prompts.

    .venv/bin/python bench/generation.py [--prompts 120] [--batch-size B] [--dtype bfloat16] [--max-new-tokens 48]
                                          [--continuous]

Two workloads on the default experiment's training prompts (SmolLM2-135M-Instruct, the pipeline's one-shot chat
prompts): the teacher's (n = 4 samples per prompt, temperature 0.8, top-p 0.95) and the evaluation's (greedy).
Both sides get the same prompts, dtype, max new tokens and batch size (rows decoded at once; `generate` gets
batch_size / n prompts per call with num_return_sequences = n, prompts in the same sorted order): by default each
workload at the batch its stage is configured with (teacher.batch_size, eval.batch_size), --batch-size for both. Tokens count what
each completion generated up to and including its stop token. --continuous adds transformers' own continuous
batching (`generate_batch`, paged attention: what `transformers serve --continuous-batching` runs), greedy only.
Prints tokens/s and the ratio ours / generate.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def model_folder(dtype: str) -> Path:
    """SmolLM2 as an HF folder in the cache (converted once from the GGUF in its wheel)."""
    from branchmerge.flows.config import compose
    from branchmerge.models.cache import cache_root
    from branchmerge.models.lm.hf import atomic_dir, materialize_model, publish_dir

    folder = cache_root() / "bench" / "generation" / f"smollm2-{dtype}"
    if not (folder / "config.json").exists():
        tmp = atomic_dir(folder)
        materialize_model(compose(["experiment=smollm2_cpu"]).student.source, tmp, dtype)
        publish_dir(tmp, folder)
    return folder


def conversations(n: int) -> list[list[dict]]:
    """The default experiment's first n training prompts, as the teacher sees them."""
    from branchmerge.flows.config import compose
    from branchmerge.models.data import domains

    data = compose(["experiment=smollm2_cpu"]).data
    convs = []
    for name, domain in data.domains.items():
        tasks = [t.model_dump() for t in domain.tasks]
        shots = domains.make_shots(tasks, k=data.shots, seed=data.seed + 10_000)
        items = domains.build_items(name, tasks, size=data.train_size, seed=data.seed)
        convs += [domains.build_messages(item, shots) for item in items]
    return convs[:n]


def with_hf_generate(model, tok, prompts, n, temperature, top_p, max_new_tokens, batch_size) -> list[list[list[int]]]:
    from branchmerge.models.lm.chat import stop_token_ids
    from branchmerge.models.lm.generation import left_padded

    stops = stop_token_ids(tok, model.generation_config)
    order = sorted(range(len(prompts)), key=lambda p: (prompts[p], p))
    per_call = max(1, batch_size // n)
    out: list[list[list[int]]] = [[] for _ in prompts]
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else {}
    for start in range(0, len(order), per_call):
        batch = order[start:start + per_call]
        ids, mask = left_padded([prompts[p] for p in batch], tok.pad_token_id)
        with torch.inference_mode():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 num_return_sequences=n if temperature > 0 else 1, eos_token_id=stops,
                                 pad_token_id=tok.pad_token_id, **sampling)
        rows = gen[:, ids.shape[1]:].tolist()
        per = len(rows) // len(batch)
        for i, p in enumerate(batch):
            out[p] = [cut(r, stops) for r in rows[i * per:(i + 1) * per]]
    return out


def with_generate_batch(model, tok, prompts, max_new_tokens, batch_size) -> list[list[list[int]]]:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    from branchmerge.models.lm.chat import stop_token_ids

    stops = stop_token_ids(tok, model.generation_config)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                              pad_token_id=tok.pad_token_id)
    result = model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False,
                                  continuous_batching_config=ContinuousBatchingConfig(
                                      max_requests_per_batch=batch_size, max_batch_tokens=512, num_blocks=256))
    return [[cut(list(o.generated_tokens), stops)] for o in result.values()]  # (in any order: only counted)


def cut(ids: list[int], stops: list[int]) -> list[int]:
    return next((ids[: i + 1] for i, t in enumerate(ids) if t in stops), ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=None,
                    help="rows decoded at once for both workloads (default: each workload at its stage's "
                         "configured batch, teacher.batch_size and eval.batch_size of the default experiment)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--continuous", action="store_true", help="also transformers' generate_batch (greedy)")
    args = ap.parse_args()

    from branchmerge.models.lm.generation import generate_ids, prompt_ids
    from branchmerge.models.lm.hf import load_model, load_tokenizer

    from branchmerge.flows.config import compose

    folder = model_folder(args.dtype)
    model, tok = load_model(folder, args.dtype), load_tokenizer(folder)
    prompts = prompt_ids(tok, conversations(args.prompts))
    conf = compose(["experiment=smollm2_cpu"])
    batch = {"teacher": args.batch_size or conf.teacher.batch_size, "eval": args.batch_size or conf.eval.batch_size}
    print(f"{len(prompts)} prompts (mean {sum(map(len, prompts)) / len(prompts):.0f} tokens), {args.dtype}, batch "
          f"{batch['teacher']} (teacher) / {batch['eval']} (eval) rows on both sides, max {args.max_new_tokens} new "
          f"tokens, {torch.get_num_threads()} threads", flush=True)
    workloads = {"teacher (n=4, T=0.8, top-p 0.95)": ("teacher", 4, 0.8, 0.95), "eval (greedy)": ("eval", 1, 0.0, 1.0)}
    print(f"{'workload':34} {'batch':>5} {'engine':16} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'vs generate':>12}")
    for name, (stage, n, temperature, top_p) in workloads.items():
        rows = batch[stage]
        runs = {
            "model.generate": lambda: with_hf_generate(model, tok, prompts, n, temperature, top_p,
                                                       args.max_new_tokens, rows),
            "ours": lambda: generate_ids(model, tok, prompts, n=n, temperature=temperature, top_p=top_p,
                                         max_new_tokens=args.max_new_tokens, batch_size=rows, seed=0,
                                         progress=False),
        }
        if args.continuous and temperature == 0:
            runs["generate_batch"] = lambda: with_generate_batch(model, tok, prompts, args.max_new_tokens, rows)
        rates = {}
        for engine, run in runs.items():
            start = time.perf_counter()
            out = run()
            seconds = time.perf_counter() - start
            tokens = sum(len(c) for per_prompt in out for c in per_prompt[: n if temperature > 0 else 1])
            rates[engine] = tokens / seconds
            ratio = rates[engine] / rates["model.generate"]
            print(f"{name:34} {rows:5d} {engine:16} {tokens:7d} {seconds:8.1f} {rates[engine]:9.1f} {ratio:11.2f}x",
                  flush=True)


if __name__ == "__main__":
    main()
