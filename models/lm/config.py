"""Settings of the model stage (`student:`, `teacher.model:`) and of the teacher's sampling (`teacher:`).

Importable without torch.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from models.settings import Settings

Dtype = Literal["float32", "bfloat16", "float16"]
SOURCE_FIELDS = {  # the fields each kind of model source needs
    "gguf_package": ("package", "file"),
    "gguf_parts": ("packages", "parts"),
    "hf": ("path",),
    "tiny": ("tokenizer", "seed", "config"),
}


def check_source(source: dict) -> dict:
    """The source itself, after checking its kind and the fields that kind needs (ValueError otherwise)."""
    if not isinstance(source, dict) or "kind" not in source:
        raise ValueError(f"source.kind is missing in {source!r}; allowed kinds: {list(SOURCE_FIELDS)}")
    kind = source["kind"]
    if kind not in SOURCE_FIELDS:
        raise ValueError(f"source.kind={kind!r} is unknown; allowed kinds: {list(SOURCE_FIELDS)}")
    missing = [f for f in SOURCE_FIELDS[kind] if f not in source]
    if missing:
        raise ValueError(f"source.{missing[0]} is required for kind={kind!r} (required: {list(SOURCE_FIELDS[kind])})")
    if kind == "gguf_parts" and len(source["packages"]) != len(source["parts"]):
        raise ValueError(f"source.parts has {len(source['parts'])} entries but source.packages has "
                         f"{len(source['packages'])}; they pair up one to one")
    if kind == "tiny":
        check_source(source["tokenizer"])
    return source


class ModelConfig(Settings):
    """A model by `name` (its artifact folder, model/<name>) from a `source`: a GGUF inside an installed package
    (gguf_package: package, file), a GGUF split over packages (gguf_parts: packages, parts), a local HF folder (hf:
    path) or a tiny random Llama with a real tokenizer (tiny: seed, tokenizer, config); stored in `dtype`."""

    name: str
    source: dict[str, Any]
    dtype: Dtype

    @field_validator("name")
    @classmethod
    def _name_is_a_folder(cls, name: str) -> str:
        if not name or not all(c.isalnum() or c in "._-" for c in name) or name.startswith("."):
            raise ValueError(f"model name {name!r} names a folder: use letters, digits, '.', '_' and '-'")
        return name

    @field_validator("source")
    @classmethod
    def _known_source(cls, source: dict) -> dict:
        return check_source(source)


class TeacherConfig(Settings):
    """Rejection sampling: `n` samples per training prompt at `temperature` / `top_p` (nucleus), at most
    `max_new_tokens` each, `batch_size` rows decoded at once; keep up to `keep_per_prompt` distinct responses per
    prompt that pass `keep` (verified: the task's score_answer accepts it; well_formed: finished with an extracted
    answer; all: every response)."""

    model: ModelConfig
    n: int = Field(gt=0)
    temperature: float = Field(ge=0)
    top_p: float = Field(gt=0, le=1)
    max_new_tokens: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    keep_per_prompt: int = Field(gt=0)
    keep: Literal["verified", "well_formed", "all"]

    @model_validator(mode="after")
    def _keep_at_most_n(self) -> "TeacherConfig":
        if self.keep_per_prompt > self.n:
            raise ValueError(f"teacher.keep_per_prompt={self.keep_per_prompt} > teacher.n={self.n}: at most n "
                             "responses per prompt exist")
        return self
