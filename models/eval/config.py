"""Settings of the eval stage (`eval:` in conf/eval/): every model on the held-out prompts.

Importable without torch.
"""
from __future__ import annotations

from pydantic import Field

from models.lm.config import Dtype
from models.settings import Settings


class EvalConfig(Settings):
    """Greedy pass@1 always: at most `max_new_tokens` per answer, `batch_size` rows decoded at once, weights in
    `dtype`. With `n` > 0, also n samples per prompt at `temperature` / `top_p` for pass@n (unbiased estimator)
    and maj@n (majority vote); n = 0 evaluates greedily only."""

    max_new_tokens: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    dtype: Dtype
    n: int = Field(ge=0)
    temperature: float = Field(gt=0)
    top_p: float = Field(gt=0, le=1)
