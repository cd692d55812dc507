"""mergekit YAML in: one-document configs and multi-step (mergekit-multi) recipes, by the numbers."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from branchmerge.models.merging.config import MergeConfigError
from branchmerge.models.merging.recipe import load_recipe, plan_recipe, run_recipe
from branchmerge.models.merging.run import run_merge
from tests.test_merge import tiny_llama, weights


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe_models")
    base = tiny_llama(root / "base", 0)
    return {"base": base, **{k: tiny_llama(root / k, i, like=base) for i, k in enumerate(("math", "science", "code"), 1)}}


def test_a_mergekit_yaml_file_runs_unchanged_and_equals_run_merge(zoo, tmp_path):
    text = f"""\
merge_method: ties
base_model: {zoo['base']}
models:
  - model: {zoo['math']}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {zoo['code']}
    parameters: {{weight: 0.5, density: 0.7}}
parameters:
  normalize: true
dtype: float32
"""
    (tmp_path / "ties.yml").write_text(text)
    run_recipe(load_recipe(tmp_path / "ties.yml"), tmp_path / "ours", seed=3)
    run_merge(yaml.safe_load(text), tmp_path / "direct", seed=3)
    ours, direct = weights(tmp_path / "ours"), weights(tmp_path / "direct")
    assert set(ours) == set(direct)
    for name in ours:
        assert torch.equal(ours[name], direct[name]), name
    assert json.loads((tmp_path / "ours" / "merge_config.json").read_text())["recipe"] == [yaml.safe_load(text)]


def test_two_step_recipe_equals_the_chain_by_hand_and_a_branch_can_be_the_base(zoo, tmp_path):
    # TinyR1's shape: [math, science] on the science model -> mid; [mid, code] on the code model -> final.
    recipe = """\
name: mid
merge_method: task_arithmetic
base_model: science
models:
  - {model: math, parameters: {weight: 0.7}}
  - {model: base, parameters: {weight: 0.3}}
---
merge_method: linear
models:
  - {model: mid, parameters: {weight: 2.0}}
  - {model: code, parameters: {weight: 1.0}}
"""
    aliases = {k: str(v) for k, v in zoo.items()}
    steps = plan_recipe(load_recipe(recipe), aliases)
    assert [s.label for s in steps] == ["mid", "final"] and steps[1].needs == ("mid",)
    info = run_recipe(load_recipe(recipe), tmp_path / "out", seed=0, aliases=aliases, workdir=tmp_path / "steps")
    assert [s["step"] for s in info["steps"]] == ["mid", "final"]
    w = {k: weights(v) for k, v in zoo.items()}
    out = weights(tmp_path / "out")
    for name, tensor in out.items():
        sci = w["science"][name]
        mid = sci + 0.7 * (w["math"][name] - sci) + 0.3 * (w["base"][name] - sci)
        torch.testing.assert_close(tensor, (2.0 * mid + w["code"][name]) / 3.0, msg=name)
    assert (tmp_path / "steps" / "mid" / "config.json").exists()  # kept because a workdir was given


def test_intermediate_steps_are_deleted_without_a_workdir(zoo, tmp_path):
    w = {"parameters": {"weight": 1.0}}
    recipe = [{"name": "m", "merge_method": "linear", "models": ["math", "code"], **w},
              {"merge_method": "linear", "models": ["m", "science"], **w}]
    run_recipe(recipe, tmp_path / "out", seed=0, aliases={k: str(v) for k, v in zoo.items()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_named_steps_draw_their_own_random_stream(zoo, tmp_path):
    # The same DARE step under two names must not reuse one mask: a step's seed comes from (seed, name).
    aliases = {k: str(v) for k, v in zoo.items()}
    step = {"merge_method": "dare_linear", "base_model": "base",
            "models": [{"model": "math", "parameters": {"weight": 1.0, "density": 0.3}}]}
    for name in ("x", "y"):
        run_recipe([{"name": name, **step}, {"merge_method": "linear", "models": [name, "code"],
                                                  "parameters": {"weight": 1.0}}],
                   tmp_path / name, seed=0, aliases=aliases)
    a, b = weights(tmp_path / "x"), weights(tmp_path / "y")
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("recipe, message", [
    ("merge_method: linear\nmodels: [Qwen/Qwen2.5-0.5B, math]\n",
     r"recipe document 0\.models\[0\]\.model: 'Qwen/Qwen2.5-0.5B' is not an earlier step, a known model "
     r"\(.*\) or a local model folder with config\.json \(hub ids are not downloaded"),
    ("merge_method: linear\nmodels: [math, code]\nslices: []\n",
     r"recipe document 0: slices, models: give the models one way"),
    ("merge_method: linear\nmodels: [math, code]\ntokenizer: {source: union}\n",
     r"tokenizer: mergekit's 'tokenizer' is not supported"),
    ("merge_method: linear\nmodels: [math, later]\n---\nname: later\nmerge_method: linear\nmodels: [math, code]\n",
     r"models\[1\]\.model: step 'later' is defined later in the recipe"),
    ("name: a\nmerge_method: linear\nmodels: [math, code]\nparameters: {weight: 1}\n---\n"
     "merge_method: linear\nmodels: [math, science]\nparameters: {weight: 1}\n",
     r"step\(s\) 'a' are not used by the final merge 'final'"),
    ("name: math\nmerge_method: linear\nmodels: [base, code]\n---\nmerge_method: linear\nmodels: [math, code]\n",
     r"recipe step 'math': the name is already a model"),
    ("merge_method: linear\nmodels: [math, code]\nparameters: {weight: 1}\n---\n"
     "merge_method: linear\nmodels: [math, code]\nparameters: {weight: 1}\n",
     r"recipe document 1: only one unnamed \(final\) document"),
    ("merge_method: ties\nmodels: [math, code]\n",
     r"recipe document 0: base_model: merge_method ties needs a base model"),
    ("merge_method: [linear\n", r"not valid YAML"),
    ("no_such_recipe.yml", r"recipe .no_such_recipe.yml.: no such file"),
])
def test_bad_recipes_fail_before_any_weight_is_read(zoo, recipe, message):
    with pytest.raises(MergeConfigError, match=message):
        plan_recipe(load_recipe(recipe), {k: str(v) for k, v in zoo.items()})


def test_cli_is_a_drop_in_for_mergekit_yaml(zoo, tmp_path):
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(
        {"merge_method": "linear", "models": [{"model": "m", "parameters": {"weight": 1}}, {"model": str(zoo["code"])}],
         "parameters": {"weight": 1.0}}))
    done = subprocess.run([sys.executable, "-m", "branchmerge.models.merging", str(tmp_path / "cfg.yml"), str(tmp_path / "out"),
                           "--model", f"m={zoo['math']}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out, m, c = weights(tmp_path / "out"), weights(zoo["math"]), weights(zoo["code"])
    for name in out:
        torch.testing.assert_close(out[name], (m[name] + c[name]) / 2, msg=name)
    bad = subprocess.run([sys.executable, "-m", "branchmerge.models.merging", str(tmp_path / "cfg.yml"), str(tmp_path / "o2")],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "models[0].model: 'm' is not an earlier step" in bad.stderr
    assert not (tmp_path / "o2").exists()


def cli(*args):
    return subprocess.run([sys.executable, "-m", "branchmerge.models.merging", *map(str, args)], capture_output=True, text=True)


def test_cli_never_writes_into_a_users_folder_without_overwrite(zoo, tmp_path):
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump_all([
        {"name": "mid", "merge_method": "linear", "models": [str(zoo["math"]), str(zoo["code"])],
         "parameters": {"weight": 1.0}},
        {"merge_method": "linear", "models": ["mid", str(zoo["science"])], "parameters": {"weight": 1.0}}]))
    mine = tmp_path / "steps" / "mid"  # the user's own folder, named like a recipe step
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    refused = cli(tmp_path / "cfg.yml", tmp_path / "out", "--intermediate-dir", tmp_path / "steps")
    assert refused.returncode != 0 and "--overwrite" in refused.stderr and "Traceback" not in refused.stderr
    assert (mine / "notes.txt").read_text() == "mine" and not (tmp_path / "out").exists()
    done = cli(tmp_path / "cfg.yml", tmp_path / "out", "--intermediate-dir", tmp_path / "steps", "--overwrite")
    assert done.returncode == 0, done.stderr
    assert (mine / "config.json").exists() and not (mine / "notes.txt").exists()


def test_cli_resolves_named_models_inside_slices(zoo, tmp_path):
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(
        {"slices": [{"sources": [{"model": "m", "layer_range": [0, 2]}, {"model": "c", "layer_range": [0, 2]}]}],
         "merge_method": "slerp", "base_model": "m", "parameters": {"t": 0.5}}))
    done = cli(tmp_path / "cfg.yml", tmp_path / "out", "--model", f"m={zoo['math']}", "--model", f"c={zoo['code']}")
    assert done.returncode == 0, done.stderr
    out, m, c = weights(tmp_path / "out"), weights(zoo["math"]), weights(zoo["code"])
    assert all(not torch.equal(out[n], m[n]) and not torch.equal(out[n], c[n]) for n in out if "layers" in n)


def test_cli_names_a_pickle_only_input_in_one_line(zoo, tmp_path):
    """A pytorch_model.bin folder (a pickle: loading it can run code) is refused with one line, no traceback."""
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text("{}")
    (legacy / "pytorch_model.bin").write_bytes(b"not read")
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(
        {"merge_method": "linear", "models": [str(zoo["math"]), str(legacy)], "parameters": {"weight": 1.0}}))
    refused = cli(tmp_path / "cfg.yml", tmp_path / "out")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr, refused.stderr
    assert refused.stderr.strip() == (
        f"error: {legacy}: only pytorch_model.bin found; only safetensors is read (re-save the model with "
        "save_pretrained(..., safe_serialization=True))")
    assert not (tmp_path / "out").exists()


def test_the_output_is_never_one_of_the_inputs(zoo, tmp_path):
    before = weights(zoo["math"])
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(
        {"merge_method": "linear", "models": [str(zoo["math"]), str(zoo["code"])], "parameters": {"weight": 1.0}}))
    for out in (zoo["math"], zoo["math"].parent):  # the input itself, or a folder holding it
        refused = cli(tmp_path / "cfg.yml", out, "--overwrite")
        assert refused.returncode != 0 and "would destroy it" in refused.stderr, refused.stderr
    after = weights(zoo["math"])
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_merged_folders_are_readable_by_others(zoo, tmp_path):
    run_merge({"merge_method": "linear", "models": [str(zoo["math"]), str(zoo["code"])],
               "parameters": {"weight": 1.0}}, tmp_path / "out", seed=0)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask
