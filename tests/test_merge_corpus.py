"""Published mergekit configs (tests/merge_corpus/*.yml) through our run_merge, against mergekit 0.1.5's outputs.

Each YAML is a config published with a real merge (its source is named at its top), adapted to the tiny local
models of tests/merge_corpus/models.py. bench/merge_corpus_expected.py merged every one once with the real
mergekit and stored what came out in tests/merge_corpus/expected/. Here the same models are rebuilt, each config
goes through our engine, and the output must match: the same tensor names, shapes and dtypes, config.json
fields and tokenizer (vocabulary and chat template); and for the deterministic configs every tensor equal to
mergekit's (bit for bit, or within 1e-6 in float32). DARE / DELLA draw random masks that no two RNGs share:
for those only the structure is compared.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

from branchmerge.models.merging.run import run_merge

CORPUS = Path(__file__).resolve().parent / "merge_corpus"
TOLERANCE = 1e-6  # max |ours - mergekit| in float32 where not bit-identical


def _load(name: str):
    # by path, as the bench does in mergekit's venv: a plain `import models` would find the repository's models/
    spec = importlib.util.spec_from_file_location(f"merge_corpus_{name}", CORPUS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


models = _load("models")
corpus = _load("corpus")
NAMES = corpus.config_names()


def expected(name: str) -> dict:
    return json.loads((corpus.EXPECTED / f"{name}.json").read_text())


@pytest.fixture(scope="session")
def corpus_models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("merge_corpus") / "models"
    models.build_models(root)
    return root


def test_corpus_is_complete():
    """Every config names its source, has an expected output, and enough of them can be compared value for value."""
    assert len(NAMES) >= 12, NAMES
    for name in NAMES:
        assert (CORPUS / f"{name}.yml").read_text().startswith("# Source:"), f"{name}.yml: no '# Source:' header"
        assert (corpus.EXPECTED / f"{name}.json").is_file(), f"{name}: no expected output; run the bench"
    deterministic = [n for n in NAMES if not expected(n)["stochastic"]]
    assert len(deterministic) >= 10, deterministic
    for name in deterministic:
        assert (corpus.EXPECTED / f"{name}.safetensors").is_file(), f"{name}: expected tensors missing"


def test_models_are_the_ones_mergekit_merged(corpus_models):
    """The inputs built here are byte for byte those the expected outputs were made from (else every comparison
    below would fail for a reason that is not the engine's: e.g. a torch whose randn differs)."""
    want = json.loads((corpus.EXPECTED / "models.json").read_text())["tensors_sha256"]
    got = {p.name: corpus.tensors_sha256(corpus.read_tensors(p)) for p in sorted(corpus_models.iterdir())}
    assert got == want


def _dtype_field(cfg: dict):
    # transformers 5 writes `dtype`, 4.x `torch_dtype`: the same fact under either name
    return cfg.get("dtype") or cfg.get("torch_dtype")


def _structure_problems(want: dict, ours: dict) -> list[str]:
    problems = []
    missing = sorted(set(want["tensors"]) - set(ours["tensors"]))
    extra = sorted(set(ours["tensors"]) - set(want["tensors"]))
    if missing:
        problems.append(f"tensors missing ({len(missing)}): {missing[:8]}")
    if extra:
        problems.append(f"tensors not in mergekit's output ({len(extra)}): {extra[:8]}")
    differ = [f"{k}: ours {ours['tensors'][k]}, mergekit {v}" for k, v in want["tensors"].items()
              if k in ours["tensors"] and ours["tensors"][k] != v]
    if differ:
        problems.append(f"shape/dtype differs ({len(differ)}): " + "; ".join(differ[:8]))
    for key in ("num_hidden_layers", "vocab_size", "tie_word_embeddings"):
        if ours["config_json"].get(key) != want["config_json"].get(key):
            problems.append(f"config.json {key}: ours {ours['config_json'].get(key)!r}, "
                            f"mergekit {want['config_json'].get(key)!r}")
    if _dtype_field(ours["config_json"]) != _dtype_field(want["config_json"]):
        problems.append(f"config.json dtype: ours {_dtype_field(ours['config_json'])!r}, "
                        f"mergekit {_dtype_field(want['config_json'])!r}")
    for key in ("vocab_size", "len", "vocab_sha256"):
        if ours["tokenizer"][key] != want["tokenizer"][key]:
            problems.append(f"tokenizer {key}: ours {ours['tokenizer'][key]!r}, mergekit {want['tokenizer'][key]!r}")
    if ours["tokenizer"]["chat_template"] != want["tokenizer"]["chat_template"]:
        problems.append(f"chat_template: ours {ours['tokenizer']['chat_template']!r:.120}, "
                        f"mergekit {want['tokenizer']['chat_template']!r:.120}")
    return problems


def _value_problems(name: str, out: Path) -> tuple[list[str], float]:
    from safetensors.torch import load_file

    want = load_file(str(corpus.EXPECTED / f"{name}.safetensors"))
    ours = corpus.read_tensors(out)
    diffs = {}
    for key, w in want.items():
        o = ours.get(key)
        if o is None or o.shape != w.shape:
            continue  # reported by the structure check
        if torch.equal(o, w) and o.dtype == w.dtype:
            diffs[key] = 0.0
            continue
        a, b = o.float(), w.float()
        nan = a.isnan() != b.isnan()
        diffs[key] = math.inf if bool(nan.any()) else float((a - b).nan_to_num().abs().max())
    worst = sorted(((d, k) for k, d in diffs.items() if d > TOLERANCE), reverse=True)
    problems = []
    if worst:
        problems.append(f"{len(worst)}/{len(diffs)} tensors differ by more than {TOLERANCE:g} (float32): "
                        + "; ".join(f"{k} {d:.3g}" for d, k in worst[:12]))
    return problems, max(diffs.values(), default=0.0)


@pytest.mark.parametrize("name", NAMES)
def test_published_config_matches_mergekit(name, corpus_models, tmp_path):
    want = expected(name)
    yml = (CORPUS / f"{name}.yml").read_bytes()
    assert hashlib.sha256(yml).hexdigest() == want["yaml_sha256"], (
        f"{name}.yml changed since its expected output was made: rerun bench/merge_corpus_expected.py {name}"
    )
    config = yaml.safe_load(corpus.config_text(name, corpus_models))
    out = tmp_path / "out"
    run_merge(config, out, seed=0)

    ours = corpus.summarize(out)
    problems = _structure_problems(want, ours)
    max_diff = None
    if not want["stochastic"]:
        value_problems, max_diff = _value_problems(name, out)
        problems += value_problems
    where = f"{name} ({want['merge_method']}{', structure only' if want['stochastic'] else ''}"
    where += f", max |ours - mergekit| {max_diff:.3g})" if max_diff is not None else ")"
    assert not problems, where + ":\n  " + "\n  ".join(problems)
