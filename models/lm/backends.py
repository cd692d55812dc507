"""Where the teacher and eval stages generate (`teacher.backend`, `eval.backend`): one registry, three backends.

    hf      our decode loop around the transformers model in this process (models/lm/generation.py): the default
    openai  any OpenAI-compatible server (vLLM, SGLang, llama.cpp's server, `transformers serve`)
    vllm    vLLM's offline engine in this process (the `vllm` extra, CUDA)

Each backend is opened on one model (`open_backend`) and answers `generate(conversations, n, temperature, top_p,
max_new_tokens, seed, desc)` with, per conversation, n completions {"text", "num_tokens", "finished"}: the
stages verify, score and keep them the same way whichever backend produced them. temperature 0 is greedy: one
completion per prompt, repeated n times.

The openai backend, shaped by what servers do and by crashes:
- One request per sample (no `n`): servers disagree on `n` (`transformers serve` and llama.cpp's server ignore
  it), and only a one-choice answer's `usage` counts that completion's tokens; servers with prefix caching (vLLM,
  SGLang) read a prompt once however many requests repeat it. Each sampled request carries a seed derived from
  (seed, prompt, sample), so a server that honours seeds (vLLM, SGLang) answers a rerun the same way.
- Every answered request is appended (one JSON line, flushed) to a request log in the stage's scratch folder; a
  stage killed mid-way and run again reads it and asks only for what is missing. A line is found again by the
  hash of its request body, so a changed prompt or setting is asked anew.
- At most `concurrency` requests in flight; each gets `timeout_s`; connection errors, timeouts, 408/409/429 and 5xx
  are retried `retries` times with exponential backoff; then StageError names the URL (and nothing is sealed).
  Other errors (400, 401, 404: a wrong model id or key) fail at once with the server's message.
- The API key is read from the environment variable `api_key_env` names, when the stage runs; it is never
  logged, stored or hashed, and neither is the URL: the cache key holds the served model id and the sampling.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable

from branchmerge.models.lm.config import GenerationBackend

log = logging.getLogger("branchmerge")


class BackendError(RuntimeError):
    """A backend could not answer; the message names the setting to look at (URL, model id, key)."""


class HF:
    """Our engine in this process (models/lm/generation.py), on the model folder in `dtype`."""

    def __init__(self, cfg: GenerationBackend, *, model_dir: str, dtype: str, batch_size: int, **_: Any):
        from branchmerge.models.lm.hf import load_model, load_tokenizer

        self.model, self.tokenizer, self.batch_size = load_model(model_dir, dtype), load_tokenizer(model_dir), batch_size

    def generate(self, conversations: list[list[dict]], *, n: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int, desc: str) -> list[list[dict]]:
        from branchmerge.models.lm import generation

        return generation.generate(self.model, self.tokenizer, conversations, n=n, temperature=temperature,
                                   top_p=top_p, max_new_tokens=max_new_tokens, batch_size=self.batch_size,
                                   seed=seed, desc=desc)


# Statuses worth asking again (the server is busy, restarting or overloaded); others are the request's fault.
RETRY_STATUSES = {408, 409, 429}


def request_seed(seed: int, prompt: int, sample: int) -> int:
    """A per-request seed from the stage's seed, the prompt's index and the sample's index (fits int32)."""
    digest = hashlib.sha256(f"{seed}/{prompt}/{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class RequestLog:
    """Answered requests, one JSON line each ({"request": hash, "text", "num_tokens", "finished"}), appended and
    flushed as they arrive so a killed stage loses at most the requests in flight. A torn last line (the process
    died mid-write) is ignored."""

    def __init__(self, path: Path):
        self.path, self.lock, self.answers = path, threading.Lock(), {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    self.answers[row["request"]] = {k: row[k] for k in ("text", "num_tokens", "finished")}
                except (ValueError, KeyError, TypeError):
                    continue
        path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, request: str, answer: dict) -> None:
        with self.lock, open(self.path, "a") as f:
            f.write(json.dumps({"request": request, **answer}, ensure_ascii=False) + "\n")
            f.flush()
            self.answers[request] = answer


class OpenAI:
    """An OpenAI-compatible server's /chat/completions, through the `openai` client (see the module doc)."""

    def __init__(self, cfg: GenerationBackend, *, section: str, served_model: str, scratch: Path, **_: Any):
        import openai

        self.cfg, self.section, self.model = cfg.openai, section, served_model
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
        key = os.environ.get(cfg.openai.api_key_env) if cfg.openai.api_key_env else None
        if cfg.openai.api_key_env and not key:
            raise BackendError(f"{section}.openai.api_key_env={cfg.openai.api_key_env!r}: that environment variable "
                               "is not set")
        # The client's own retry loop has a fixed backoff; ours follows openai.retries / openai.backoff_s.
        self.client = openai.OpenAI(base_url=cfg.openai.base_url, api_key=key or "none", max_retries=0,
                                    timeout=cfg.openai.timeout_s)
        self.log = RequestLog(scratch / "requests.jsonl")

    def generate(self, conversations: list[list[dict]], *, n: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int, desc: str) -> list[list[dict]]:
        from tqdm.auto import tqdm

        samples = 1 if temperature == 0 else n
        bodies: dict[tuple[int, int], dict] = {}
        for p, messages in enumerate(conversations):
            for s in range(samples):
                body = {"model": self.model, "messages": messages, "max_tokens": max_new_tokens,
                        "temperature": temperature}
                if temperature > 0:
                    body |= {"top_p": top_p, "seed": request_seed(seed, p, s)}
                bodies[p, s] = body
        hashes = {ps: hashlib.sha256(json.dumps(b, sort_keys=True).encode()).hexdigest() for ps, b in bodies.items()}
        todo = [ps for ps, h in hashes.items() if h not in self.log.answers]
        if len(todo) < len(bodies):
            log.info("%s: %d of %d requests answered before (request log %s); asking the other %d", desc,
                     len(bodies) - len(todo), len(bodies), self.log.path, len(todo))
        with tqdm(total=len(bodies), initial=len(bodies) - len(todo), desc=desc, unit="request") as bar, \
                ThreadPoolExecutor(self.cfg.concurrency) as pool:
            futures = [pool.submit(self.ask, bodies[ps], hashes[ps], bar) for ps in todo]
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for f in pending:
                f.cancel()
            for f in done:
                f.result()  # the first failure, if any, stops the stage (answered requests stay in the log)
        return [[self.log.answers[hashes[p, s if temperature > 0 else 0]] for s in range(n)]
                for p in range(len(conversations))]

    def ask(self, body: dict, request: str, bar) -> None:
        import openai

        url = self.cfg.base_url
        for attempt in range(self.cfg.retries + 1):
            try:
                reply = self.client.chat.completions.create(**body)
                break
            except (openai.APIConnectionError, openai.APIStatusError) as err:  # APITimeoutError is a connection error
                status = getattr(err, "status_code", None)
                if status is not None and status not in RETRY_STATUSES and status < 500:
                    raise BackendError(f"{self.section}.openai: the server at {url} refused model "
                                       f"{self.model!r} with HTTP {status}: {err}") from None
                if attempt == self.cfg.retries:
                    what = f"HTTP {status}" if status is not None else type(err).__name__
                    raise BackendError(f"{self.section}.openai.base_url={url!r}: no answer after "
                                       f"{self.cfg.retries + 1} tries ({what}: {err}); is the server up?") from None
                time.sleep(self.cfg.backoff_s * 2**attempt)
        choice = reply.choices[0]
        tokens = reply.usage.completion_tokens if reply.usage is not None else None
        self.log.add(request, {"text": choice.message.content or "", "num_tokens": tokens,
                               "finished": choice.finish_reason == "stop"})
        bar.update()


class VLLM:
    """vLLM's offline engine on the model folder (the `vllm` extra; needs CUDA)."""

    def __init__(self, cfg: GenerationBackend, *, model_dir: str, dtype: str, **_: Any):
        from vllm import LLM

        # each generate() seeds its own sampling (SamplingParams.seed), as the hf backend does
        self.llm = LLM(model=model_dir, dtype=dtype, gpu_memory_utilization=cfg.vllm.gpu_memory_utilization,
                       max_model_len=cfg.vllm.max_model_len)

    def generate(self, conversations: list[list[dict]], *, n: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int, desc: str) -> list[list[dict]]:
        from vllm import SamplingParams

        samples = 1 if temperature == 0 else n
        params = SamplingParams(n=samples, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                                max_tokens=max_new_tokens, seed=seed)
        outputs = self.llm.chat(conversations, params, use_tqdm=True)
        return [[{"text": o.text, "num_tokens": len(o.token_ids), "finished": o.finish_reason == "stop"}
                 for o in out.outputs] * (n // samples) for out in outputs]


BACKENDS: dict[str, Callable[..., Any]] = {"hf": HF, "openai": OpenAI, "vllm": VLLM}


def open_backend(cfg: GenerationBackend, *, section: str, model_dir: str | None, served_model: str | None,
                 dtype: str, batch_size: int, scratch: Path):
    """The backend `cfg.backend` opened on one model: the folder `model_dir` (hf, vllm) or `served_model` on the
    server (openai); `scratch` keeps the openai request log across a crash."""
    return BACKENDS[cfg.backend](cfg, section=section, model_dir=model_dir, served_model=served_model, dtype=dtype,
                                 batch_size=batch_size, scratch=scratch)
