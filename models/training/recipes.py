"""SFT data recipes: which examples each training stage sees. A recipe turns a branch's data into stages; each
stage is one train_sft run starting from the previous stage's weights (a fresh optimizer and schedule, as the
papers ran them).

- single: one stage on the branch's own (specialised) examples.
- dmt (DMT, Dong et al. 2024, "How Abilities in LLMs are Affected by SFT Data Composition"): stage 1 on the
  specialised examples; stage 2 on the general examples plus a fraction `dmt_k` of the specialised ones (a
  seeded sample, replayed against forgetting). In the pipeline, "general" is every other domain's teacher data.
- curriculum (Light-R1): stage 1 on all specialised examples; stage 2 on the hardest `hard_fraction` of them by
  the teacher's pass rate on their prompt (lowest first; ties keep the data order).

Public API:
    recipe_stages(cfg, specialised, *, general, pass_rates, seed) -> [[example]]
    train_recipe(cfg, model_dir, stages, out_dir, *, seed, checkpoint_dir, **train_sft_kwargs) -> metrics
"""

from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
from pathlib import Path

from branchmerge.models.training.config import SFTConfig
from branchmerge.models.training.sft import train_sft

DONE = "stage_metrics.json"  # written last into a finished intermediate stage's model folder


def dmt_stages(specialised: list[dict], general: list[dict], dmt_k: float, seed: int) -> list[list[dict]]:
    """[specialised, general + round(dmt_k * len(specialised)) specialised examples drawn without replacement]."""
    if not general:
        raise ValueError("sft.recipe=dmt needs general data for stage 2: there is no other domain's data "
                         "(set data.domains to two or more domains, or use sft.recipe=single)")
    replay = random.Random(seed).sample(specialised, round(dmt_k * len(specialised)))
    return [list(specialised), list(general) + replay]


def curriculum_stages(examples: list[dict], pass_rates: list[float], hard_fraction: float) -> list[list[dict]]:
    """[all examples, the ceil(hard_fraction * n) with the lowest teacher pass rate]."""
    if len(pass_rates) != len(examples):
        raise ValueError(f"curriculum: {len(pass_rates)} pass rates for {len(examples)} examples")
    order = sorted(range(len(examples)), key=lambda i: pass_rates[i])  # stable: equal rates keep data order
    hardest = sorted(order[: math.ceil(hard_fraction * len(examples))])
    return [list(examples), [examples[i] for i in hardest]]


def recipe_stages(cfg: SFTConfig, specialised: list[dict], *, general: list[dict], pass_rates: list[float],
                  seed: int) -> list[list[dict]]:
    """The stages cfg.recipe makes of a branch's examples (cfg.dmt_k, cfg.hard_fraction as the recipe needs)."""
    if cfg.recipe == "dmt":
        return dmt_stages(specialised, general, cfg.dmt_k, seed)
    if cfg.recipe == "curriculum":
        return curriculum_stages(specialised, pass_rates, cfg.hard_fraction)
    return [list(specialised)]


def online_mixing(cfg: SFTConfig, examples: list[dict]) -> bool:
    """Whether a stage trains with Aioli's online mixture: cfg.mixing=aioli and its data spans two or more domains
    (the mixed-data baseline, DMT's stage 2); a one-domain stage has nothing to mix."""
    return cfg.mixing == "aioli" and len({e["domain"] for e in examples}) >= 2


def train_recipe(cfg: SFTConfig, model_dir, stages: list[list[dict]], out_dir, *, seed: int, checkpoint_dir=None,
                 dev: dict[str, list[dict]] | None = None, **train_kwargs) -> dict:
    """Run the stages in order (train_sft with cfg each; a multi-domain stage with cfg.mixing=aioli:
    aioli_sft.train_sft_aioli over its domains, their losses measured on `dev`, domain -> gold examples); the last
    writes `out_dir`. Returns the last stage's metrics plus "stages" (every stage's) and totals of steps and tokens.

    With a checkpoint_dir, each stage checkpoints under checkpoint_dir/stage-<i> and a finished intermediate
    stage keeps its model there: a rerun after a crash skips the finished stages and resumes the one in progress.
    """
    scratch = Path(checkpoint_dir) if checkpoint_dir is not None else Path(tempfile.mkdtemp(prefix="sft-stages-"))
    metrics, current = [], str(model_dir)
    try:
        for i, examples in enumerate(stages, start=1):
            stage_dir = scratch / f"stage-{i}"
            final = i == len(stages)
            target = Path(out_dir) if final else stage_dir / "model"
            if not final and (target / DONE).exists():
                metrics.append(json.loads((target / DONE).read_text()))
            else:
                if not final and target.exists():
                    shutil.rmtree(target)  # half-written by a killed run: the checkpoint has its progress
                if online_mixing(cfg, examples):
                    from branchmerge.models.training.aioli_sft import train_sft_aioli

                    groups: dict[str, list[dict]] = {}
                    for e in examples:
                        groups.setdefault(e["domain"], []).append(e)
                    m = train_sft_aioli(cfg, current, groups, {d: dev[d] for d in groups}, target, seed=seed,
                                        logger=train_kwargs.get("logger"))
                else:
                    m = train_sft(cfg, current, examples, target, seed=seed,
                                  checkpoint_dir=stage_dir if checkpoint_dir else None, **train_kwargs)
                metrics.append(m)
                if not final:
                    (target / DONE).write_text(json.dumps(m))
            current = str(target)
    finally:
        if checkpoint_dir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    return {**metrics[-1], "stages": metrics, "steps_total": sum(m["steps"] for m in metrics),
            "tokens_total": sum(m["tokens"] for m in metrics)}
