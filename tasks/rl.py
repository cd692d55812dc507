"""RL stages on the merged model, in the order of `rl.stages` (e.g. [dpo, grpo], Light-R1's order), each its own
cached artifact `rl/<stage>` reading the one before it (the first reads the merge):

- grpo: GRPO with the reward registry's `rl.rewards` on the training prompts (models/training/grpo.py);
- dpo: DPO on preference pairs (models/training/dpo.py), from the teacher's verified / failed samples or the
  policy's own (semi-on-policy); the pairs are written into the artifact with their counts;
- sasr: SFT warm-up on the teacher's kept responses, then SFT or GRPO per step (models/training/sasr.py).

Items: the stages. Each stage's key holds only the settings it reads, so a change to grpo's settings keeps a dpo
artifact before it.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from branchmerge.models.training.config import RLConfig
from branchmerge.tasks.common import Job, make_job, read_json, read_jsonl, write_jsonl
from branchmerge.tasks.store import ArtifactRef

if TYPE_CHECKING:
    from branchmerge.flows.schema import PipelineConfig

# What each stage reads of `rl:` (besides its own sub-section): the rest does not enter its key.
NOT_GRPO = ("enabled", "stages", "dpo", "sasr")


def items(cfg: PipelineConfig) -> list[str]:
    return list(cfg.rl.stages) if cfg.rl.enabled else []


def final(cfg: PipelineConfig) -> str:
    """The artifact of the RL model the pipeline ends with."""
    return f"rl/{cfg.rl.stages[-1]}"


def previous(cfg: PipelineConfig, item: str) -> str:
    i = cfg.rl.stages.index(item)
    return "merge" if i == 0 else f"rl/{cfg.rl.stages[i - 1]}"


def uses_teacher(cfg: PipelineConfig, item: str) -> bool:
    return item == "sasr" or (item == "dpo" and cfg.rl.dpo.pairs_from == "teacher")


def needs(cfg: PipelineConfig, item: str) -> list[str]:
    return [previous(cfg, item), "mix", *(["teacher"] if uses_teacher(cfg, item) else [])]


def settings(cfg: PipelineConfig, item: str) -> dict[str, Any]:
    grpo = cfg.rl.model_dump(exclude=set(NOT_GRPO))
    if item == "grpo":
        return {"grpo": grpo}
    if item == "dpo":
        return {"dpo": cfg.rl.dpo.model_dump()}
    return {"grpo": grpo, "sasr": cfg.rl.sasr.model_dump()}


def plan(cfg: PipelineConfig, item: str, refs: dict[str, ArtifactRef]) -> Job:
    upstream = {"model": refs[previous(cfg, item)], "mix": refs["mix"]}
    if uses_teacher(cfg, item):
        upstream["teacher"] = refs["teacher"]
    hint = (f"rl.dpo.lr={cfg.rl.dpo.lr} (lower it), rl.dpo.beta={cfg.rl.dpo.beta}" if item == "dpo" else
            f"rl.lr={cfg.rl.lr} (lower it), rl.beta={cfg.rl.beta}, rl.precision={cfg.rl.precision}")
    return make_job(f"rl/{item}", {"stage": item, **settings(cfg, item), "rl": cfg.rl.model_dump(),
                                   "seed": cfg.run.seed},
                    upstream, __name__, cfg.run.store, "rl" in cfg.run.refresh, hint=hint,
                    key_config={"stage": item, **settings(cfg, item), "seed": cfg.run.seed})


def build(job: Job, out: Path, logger=None) -> dict[str, Any]:
    from branchmerge.models.data import domains

    cfg, item, seed = RLConfig.model_validate(job.config["rl"]), job.config["stage"], job.config["seed"]
    mix = Path(job.upstream["mix"].path)
    items_ = read_jsonl(mix / "train.jsonl")
    shots = read_json(mix / "shots.json")
    model_dir = job.upstream["model"].path

    def build_messages(it):
        return domains.build_messages(it, shots[it["domain"]])

    if item == "dpo":
        return build_dpo(cfg, job, model_dir, items_, build_messages, out, seed, logger)
    from branchmerge.models.training.rewards import combine

    reward_fn = combine(cfg.rewards, cfg.reward_weights)
    if item == "grpo":
        from branchmerge.models.training.grpo import train_grpo

        return train_grpo(cfg, model_dir, items_, reward_fn, build_messages, out, seed=seed, logger=logger)
    from branchmerge.models.training.sasr import train_sasr
    from branchmerge.tasks.sft import MIXTURE, examples_for

    return train_sasr(cfg, model_dir, items_, reward_fn, build_messages,
                      examples_for(job.upstream["teacher"].path, MIXTURE), out, seed=seed, logger=logger)


def build_dpo(cfg: RLConfig, job: Job, model_dir: str, items_: list[dict], build_messages, out: Path, seed: int,
              logger) -> dict[str, Any]:
    """Pairs (teacher's or the policy's samples), written to pairs.jsonl with their counts; then DPO."""
    from branchmerge.models.data import pairs as pair_data
    from branchmerge.models.training.dpo import train_dpo

    dpo = cfg.dpo
    if dpo.pairs_from == "teacher":
        rows = read_jsonl(Path(job.upstream["teacher"].path) / "samples.jsonl")
        # the teacher answered the mix's prompts (train and eval ones): each row's prompt, rebuilt from its item
        mix = Path(job.upstream["mix"].path)
        items_by_id = {it["id"]: it for name in ("train.jsonl", "eval.jsonl") for it in read_jsonl(mix / name)}
        train_ids = {it["id"] for it in items_}  # never prefer answers to held-out prompts
        rows = [r for r in rows if r["id"] in train_ids]
        pairs = pair_data.teacher_pairs(rows, {i: build_messages(items_by_id[i]) for i in train_ids}, dpo.max_pairs)
        prompts = len({r["id"] for r in rows})
    else:
        from branchmerge.models.lm.hf import load_model, load_tokenizer
        from branchmerge.models.training.rewards import combine

        model, tokenizer = load_model(model_dir, "float32"), load_tokenizer(model_dir)
        pairs = pair_data.policy_pairs(model, tokenizer, items_, build_messages, combine(["correctness"], None), dpo,
                                       seed)
        prompts = len(items_)
        del model
    counts = pair_data.pair_counts(pairs, prompts)
    if not pairs:
        raise ValueError(f"rl.dpo: no preference pairs from the {dpo.pairs_from}'s samples ({counts}): every prompt's "
                         "samples were all right or all wrong; use rl.dpo.pairs_from="
                         f"{'policy' if dpo.pairs_from == 'teacher' else 'teacher'} or more samples")
    write_jsonl(out / "pairs.jsonl", pairs)
    result = train_dpo(dpo, model_dir, pairs, out, seed=seed, logger=logger)
    return {**result, "pair_counts": counts}
