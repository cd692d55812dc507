"""Check LoRA `target_modules` against the student's modules before any compute: a name that matches nothing
would otherwise fail (peft: "Target modules ... not found") after the teacher has run."""
from __future__ import annotations

import hashlib
import json

from branchmerge.models.cache import cached_json
from branchmerge.models.lm.config import ModelConfig
from branchmerge.models.training.config import LoraConfig


def check_lora_targets(lora: LoraConfig, student: ModelConfig) -> None:
    """Raise ValueError (naming sft.lora.target_modules) if the targets match no module of the student."""
    if lora.target_modules == "all-linear":  # peft's keyword: every linear layer but the output head
        return
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    names = module_names(student)
    peft_config = PeftLoraConfig(target_modules=lora.target_modules)
    if not any(check_target_module_exists(peft_config, name) for name in names):
        linear = sorted({n.rsplit(".", 1)[-1] for n in names if n.endswith("_proj") or n.endswith("lm_head")})
        raise ValueError(f"sft.lora.target_modules={lora.target_modules!r} matches no module of the student "
                         f"{student.name!r}; its linear layers end in: {', '.join(linear)} (or use 'all-linear')")


def module_names(model: ModelConfig) -> list[str]:
    """Every module name of the model `model.source` describes, from its config alone (a meta-device model, no
    weights); remembered in the cache folder per source (reading a GGUF's config takes seconds)."""
    from branchmerge.models.lm.hf import source_identity

    key = hashlib.sha256(json.dumps(source_identity(model.source), sort_keys=True).encode()).hexdigest()[:16]
    return cached_json(f"module-names-{key}.json", lambda: _module_names(model.source))


def _module_names(source: dict) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM

    from branchmerge.models.lm.hf import architecture_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(architecture_config(source))
    return [name for name, _ in model.named_modules() if name]
