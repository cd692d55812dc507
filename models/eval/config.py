"""Settings of the eval stage (`eval:` in conf/eval/): every model on the held-out prompts.

Importable without torch.
"""
from __future__ import annotations

from pydantic import Field

from typing import Any

from branchmerge.models.lm.config import Dtype, GenerationBackend


class EvalConfig(GenerationBackend):
    """Greedy pass@1 always: at most `max_new_tokens` per answer, `batch_size` rows decoded at once, weights in
    `dtype`. With `n` > 0, also n samples per prompt at `temperature` / `top_p` for pass@n (unbiased estimator)
    and maj@n (majority vote); n = 0 evaluates greedily only. `backend` says where generation runs (hf, openai,
    vllm: GenerationBackend); with openai, `openai.model` null asks the server for each evaluated artifact's
    folder, and a name containing `{item}` (base, branch/gcd, merged, ...) names one served model per item."""

    max_new_tokens: int = Field(gt=0)
    """Most tokens generated per answer."""
    batch_size: int = Field(gt=0)
    """Rows decoded at once (hf backend)."""
    dtype: Dtype
    """Dtype the evaluated weights are loaded in (hf, vllm): float32, bfloat16 or float16."""
    n: int = Field(ge=0)
    """Samples per prompt for pass@n and maj@n; 0: greedy pass@1 only."""
    temperature: float = Field(gt=0)
    """Sampling temperature of the n samples (greedy pass@1 is unaffected)."""
    top_p: float = Field(gt=0, le=1)
    """Nucleus top_p of the n samples, in (0, 1]."""

    def key(self) -> dict[str, Any]:
        """The settings that shape the generations (the cache key's part): all but where the server is."""
        return self.model_dump(exclude={"backend", "openai", "vllm"}) | self.backend_key()

    def served_model(self, item: str, folder: str) -> str:
        """The model id to ask an OpenAI-compatible server for when evaluating `item` stored in `folder`."""
        return folder if self.openai.model is None else self.openai.model.replace("{item}", item)
