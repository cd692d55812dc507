"""Settings of the eval stage (`eval:` in conf/eval/): greedy decoding of every model on the held-out prompts.

Importable without torch.
"""
from pydantic import Field

from models.lm.config import Dtype
from models.settings import Settings


class EvalConfig(Settings):
    """At most `max_new_tokens` per answer, `batch_size` prompts decoded at once, weights loaded in `dtype`."""

    max_new_tokens: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    dtype: Dtype
