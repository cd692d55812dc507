"""Make tests/merge_corpus/expected/: every config of the merge corpus merged once by the real mergekit 0.1.5.

Run in mergekit's own venv (bench/merge_vs_mergekit.py builds it), from the repository root:

    ~/.cache/branchmerge/mergekit-venv/bin/python bench/merge_corpus_expected.py [NAME ...]

It builds the tiny models with tests/merge_corpus/models.py into a temp folder (imported by path: this venv has
no branchmerge), and for each tests/merge_corpus/<NAME>.yml (all of them by default) substitutes `${models}`,
merges with mergekit's Python API (MergeConfiguration.model_validate, run_merge with copy_tokenizer=True,
random_seed=0, quiet) and writes
- expected/<NAME>.safetensors: every output tensor exactly as mergekit wrote it (deterministic configs only;
  the random ones, DARE / DELLA, cannot be compared value for value across RNGs);
- expected/<NAME>.json: corpus.summarize() of the output folder (tensor names / shapes / dtypes, config.json
  fields, tokenizer vocabulary size and hash, chat template) plus `stochastic`, the merge method and versions;
- expected/models.json: a hash of every input model's tensors (the test checks its own build against them).
A config mergekit refuses is a wrong config: the script stops on it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "merge_corpus"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"merge_corpus_{name}", CORPUS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(names: list[str]) -> None:
    from importlib.metadata import version

    import torch
    import transformers
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from safetensors.torch import save_file

    models, corpus = _load("models"), _load("corpus")
    names = names or corpus.config_names()
    corpus.EXPECTED.mkdir(exist_ok=True)
    versions = {"mergekit": version("mergekit"), "torch": torch.__version__, "transformers": transformers.__version__}
    assert versions["mergekit"] == "0.1.5", versions
    with tempfile.TemporaryDirectory(prefix="merge-corpus-") as tmp:
        root = Path(tmp) / "models"
        built = models.build_models(root)
        # the inputs' hashes: the test checks its own build against them (a torch whose randn differs would
        # otherwise show up as every config failing)
        hashes = {name: corpus.tensors_sha256(corpus.read_tensors(path)) for name, path in sorted(built.items())}
        (corpus.EXPECTED / "models.json").write_text(json.dumps({**versions, "tensors_sha256": hashes},
                                                                indent=1) + "\n")
        for name in names:
            text = corpus.config_text(name, root)
            raw = yaml.safe_load(text)
            cfg = MergeConfiguration.model_validate(raw)
            out = Path(tmp) / "out" / name
            t0 = time.perf_counter()
            run_merge(cfg, str(out), options=MergeOptions(copy_tokenizer=True, random_seed=0, quiet=True))
            seconds = time.perf_counter() - t0
            summary = corpus.summarize(out)
            stochastic = raw["merge_method"] in corpus.STOCHASTIC_METHODS
            record = {
                "config": name,
                "merge_method": raw["merge_method"],
                "stochastic": stochastic,
                "yaml_sha256": hashlib.sha256((corpus.HERE / f"{name}.yml").read_bytes()).hexdigest(),
                **versions,
                **summary,
                # the written config.json as mergekit wrote it, paths of the temp folder replaced
                "config_json_written": json.loads((out / "config.json").read_text().replace(str(root.resolve()),
                                                                                             "${models}")),
            }
            target = corpus.EXPECTED / f"{name}.safetensors"
            if stochastic:
                target.unlink(missing_ok=True)
            else:
                save_file(corpus.read_tensors(out), str(target), metadata={"format": "pt"})
                target.chmod(0o644)  # safetensors creates it 0600
            (corpus.EXPECTED / f"{name}.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
            print(f"{name}: {raw['merge_method']}, {len(summary['tensors'])} tensors, "
                  f"{summary['config_json']['num_hidden_layers']} layers, vocab {summary['tokenizer']['vocab_size']}, "
                  f"{seconds:.1f} s{' (stochastic: structure only)' if stochastic else ''}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
