"""Settings of the model stage (`student:`, `teacher.model:`) and of the teacher's sampling (`teacher:`).

Importable without torch.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from branchmerge.models.settings import Settings

Dtype = Literal["float32", "bfloat16", "float16"]
# models/data/cleaning.py's FILTERS, by name (tests/test_cleaning.py checks they match): named here, not imported, so
# that editing a filter changes the teacher's code version only, not every stage that reads these settings
CLEAN_FILTERS = ("truncated", "no_answer", "format", "repetition", "duplicate", "near_duplicate_prompt")
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
    """Artifact folder name (model/<name>): letters, digits, '.', '_' and '-'."""
    source: dict[str, Any]
    """Where the weights come from: `kind` gguf_package, gguf_parts, hf or tiny, plus that kind's fields."""
    dtype: Dtype
    """Dtype the weights are stored in: float32, bfloat16 or float16."""

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


Backend = Literal["hf", "openai", "vllm"]


class OpenAIConfig(Settings):
    """An OpenAI-compatible server (vLLM, SGLang, llama.cpp's server, `transformers serve`) at `base_url` (e.g.
    http://127.0.0.1:8000/v1). `model`: the served model id; null sends the model artifact's folder path, which
    servers that load local folders on request take (`transformers serve`; vLLM started on that folder with
    `--served-model-name` equal to it). `api_key_env` names the environment variable holding the API key (read
    when the stage runs; never logged or stored); null sends none. At most `concurrency` requests in flight, each
    given `timeout_s` seconds and retried `retries` times, waiting backoff_s, 2 backoff_s, 4 backoff_s, ... between
    tries. Only `model` enters the cache key: the same model served elsewhere gives the same artifact."""

    base_url: str | None
    """Server URL, http(s), e.g. http://127.0.0.1:8000/v1; required with backend=openai."""
    model: str | None
    """Served model id (the cache key's part); null: the model artifact's folder path."""
    api_key_env: str | None
    """Environment variable holding the API key (read when the stage runs, never logged); null: no key."""
    concurrency: int = Field(gt=0)
    """Most requests in flight at once."""
    timeout_s: float = Field(gt=0)
    """Seconds each request may take."""
    retries: int = Field(ge=0)
    """Retries of a failed request (0: none)."""
    backoff_s: float = Field(ge=0)
    """Seconds before the first retry; the wait doubles each try (backoff_s, 2 backoff_s, ...)."""

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("http://", "https://")):
            raise ValueError(f"base_url={url!r} is not an http(s) URL (e.g. http://127.0.0.1:8000/v1)")
        return url


class VLLMConfig(Settings):
    """vLLM's offline engine in this process (the `vllm` extra, CUDA): `gpu_memory_utilization` of the GPU for
    weights and KV cache, `max_model_len` tokens per sequence (null: the model's own limit)."""

    gpu_memory_utilization: float = Field(gt=0, le=1)
    """Fraction of GPU memory vLLM takes for weights and KV cache, in (0, 1]."""
    max_model_len: int | None = Field(gt=0)
    """Tokens per sequence (prompt and completion); null: the model's own limit."""


class GenerationBackend(Settings):
    """Where a stage generates: `backend` hf (our engine in this process, models/lm/generation.py), openai (a
    server, settings in `openai`) or vllm (settings in `vllm`). models/lm/backends.py runs them."""

    backend: Backend
    """Where generation runs: hf (our engine, in this process), openai (a server: openai.*) or vllm (vllm.*)."""
    openai: OpenAIConfig
    """OpenAI-compatible server settings, used when backend=openai."""
    vllm: VLLMConfig
    """vLLM offline engine settings, used when backend=vllm."""

    def check_backend(self, section: str) -> None:
        """ValueError naming `<section>.<field>` for a backend that cannot run as configured: checked before
        any stage computes."""
        if self.backend == "openai":
            if self.openai.base_url is None:
                raise ValueError(f"{section}.openai.base_url is required with {section}.backend=openai")
            env = self.openai.api_key_env
            if env is not None and not os.environ.get(env):
                raise ValueError(f"{section}.openai.api_key_env={env!r}: that environment variable is not set")
        if self.backend == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ValueError(f"{section}.backend=vllm needs vLLM in this environment: pip install "
                             "'branchmerge[vllm]' (CUDA only)")

    def backend_key(self) -> dict[str, Any]:
        """What of the backend changes the outputs, for the cache key: nothing for hf (its artifacts keep their
        keys), the served model id for openai (not the URL, key or timeouts), the engine for vllm."""
        if self.backend == "openai":
            return {"backend": "openai", "served_model": self.openai.model}
        if self.backend == "vllm":
            return {"backend": "vllm", "max_model_len": self.vllm.max_model_len}
        return {}


class TeacherConfig(GenerationBackend):
    """Rejection sampling: `n` samples per training prompt at `temperature` / `top_p` (nucleus), at most
    `max_new_tokens` each, `batch_size` rows decoded at once; of the responses that pass `keep` (verified: the task's
    score_answer accepts it; well_formed: finished with an extracted answer; all: every response), drop those the
    `clean` filters catch (models/data/cleaning.py), then keep up to `keep_per_prompt` distinct ones per prompt."""

    model: ModelConfig
    """The teacher model; with backend=openai and openai.model set, the server's own model answers instead."""
    n: int = Field(gt=0)
    """Samples per training prompt (best-of-n)."""
    temperature: float = Field(ge=0)
    """Sampling temperature (0: greedy)."""
    top_p: float = Field(gt=0, le=1)
    """Nucleus sampling: the smallest token set with this probability mass, in (0, 1]."""
    max_new_tokens: int = Field(gt=0)
    """Most tokens generated per response."""
    batch_size: int = Field(gt=0)
    """Rows decoded at once (hf backend)."""
    keep_per_prompt: int = Field(gt=0)
    """Most distinct responses kept per prompt (after dedupe and `clean`); at most n."""
    keep: Literal["verified", "well_formed", "all"]
    """Responses kept: verified (the task's score_answer accepts), well_formed (an extracted answer) or all."""
    clean: list[str]
    """Filters applied to the responses `keep` accepts, in order (models/data/cleaning.py: truncated, no_answer,
    format, repetition, duplicate, near_duplicate_prompt); [] = none."""

    def uses_local_model(self) -> bool:
        """Whether the teacher generates from the model/teacher artifact (hf, vllm, or a server asked for that
        folder) rather than from a model only the server has."""
        return self.backend != "openai" or self.openai.model is None

    def key(self) -> dict[str, Any]:
        """The settings that shape the teacher's samples (the cache key's part): sampling, the local model unless
        a server's own model answers, and backend_key()."""
        out = self.model_dump(exclude={"backend", "openai", "vllm"} | (set() if self.uses_local_model() else {"model"}))
        return out | self.backend_key()

    @field_validator("clean")
    @classmethod
    def _known_filters(cls, clean: list[str]) -> list[str]:
        for name in clean:
            if name not in CLEAN_FILTERS:
                raise ValueError(f"teacher.clean: unknown filter {name!r}; known filters: {list(CLEAN_FILTERS)}")
        repeated = sorted({name for name in clean if clean.count(name) > 1})
        if repeated:
            raise ValueError(f"teacher.clean: filters {repeated} are listed more than once; name each once")
        return clean

    @model_validator(mode="after")
    def _keep_at_most_n(self) -> "TeacherConfig":
        if self.keep_per_prompt > self.n:
            raise ValueError(f"teacher.keep_per_prompt={self.keep_per_prompt} > teacher.n={self.n}: at most n "
                             "responses per prompt exist")
        return self
