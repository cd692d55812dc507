"""Config composition and validation: typos and bad values fail before any compute, naming key and value.

Every check is in the schema (flows/schema.py and the stage models beside their code), so it runs whatever is
cached: composing the config is all these tests do.
"""
import ast
import inspect
from pathlib import Path

import pytest

from branchmerge.flows.config import compose
from branchmerge.flows.schema import ConfigError
from branchmerge.models.merging.config import MERGE_METHODS

ROOT = Path(__file__).resolve().parent.parent


def test_default_and_experiments_compose():
    for overrides in ([], ["experiment=smollm2_cpu"], ["experiment=tiny"]):
        cfg = compose(overrides)
        assert len(cfg.data.domains) >= 3
    tiny = compose(["experiment=tiny"])
    assert tiny.student.source["kind"] == "tiny" and tiny.teacher.model == tiny.student


@pytest.mark.parametrize("override, fragments", [
    ("merge.method=foo", ["merge.method='foo'", "linear", "ties"]),
    ("sft.lr=-1", ["sft.lr=-1", "greater than 0"]),
    ("rl.loss_type=ppo", ["rl.loss_type='ppo'", "'dapo'"]),
    ("sft.lrr=1", ["sft.lrr"]),
    ("+merge.densityy=0.5", ["merge.densityy", "unknown key"]),
    ("rl.num_generations=1", ["rl.num_generations=1"]),
    ("student.source.kind=onnx", ["student.source", "gguf_package"]),
    ("data.domains.arithmetic.tasks.0.name=no_such_task", ["no_such_task", "chain_sum"]),
])
def test_bad_config_names_key_and_allowed_values(override, fragments):
    with pytest.raises(ConfigError) as err:
        compose(["experiment=tiny", override])
    for fragment in fragments:
        assert fragment in str(err.value)


# Each finding of the stage-contract review: a setting that used to be accepted, or checked only after compute.
@pytest.mark.parametrize("overrides, fragments", [
    # a merge parameter that cannot run: checked whatever is cached (it used to pass when the mix stage was cached)
    (["sft.lr=1e-4", "merge.parameters.weight=abc"], ["invalid merge config", "weight", "'abc'"]),
    (["sft.betas=[1.5,2.0]"], ["sft.betas=[1.5, 2.0]", "[0, 1)"]),
    (["sft=lora", "sft.lora.target_modules=[nope_proj]"], ["sft.lora.target_modules=['nope_proj']", "matches no module",
                                                          "q_proj"]),
    (["sft.max_steps=0"], ["sft.max_steps=0", "trains nothing"]),
    (["data.domains.gcd.tasks.0.config.min_value=30"],
     ["data.domains.gcd.tasks.0.config=", "max_value must be > min_value"]),
    (["data.domains.gcd.tasks.0.config.min_value=abc"],
     ["data.domains.gcd.tasks.0.config=", "min_value='abc'", "valid integer"]),
    (["+data.domains.gcd.tasks.0.config.no_such_key=1"], ["data.domains.gcd.tasks.0.config=", "no_such_key"]),
    (["+data.domains.gcd.tasks.0.config.seed=3"], ["seed: set by the pipeline"]),
    (["rl.prompts_per_step=1000"], ["rl.prompts_per_step=1000 exceeds the training pool of 24 prompts"]),
    (["rl.epsilon_high=0.1"], ["rl.epsilon_high=0.1 < rl.epsilon=0.2"]),
    (["data.domains={}"], ["data.domains={}", "at least 1 item"]),
    ([f"run.name={'x' * 300}"], ["run.name", "300 characters"]),
    (["run.name=../../../escaped"], ["run.name '../../../escaped'", "names a folder"]),
    (["sft.recipe=dmt", "~data.domains.arithmetic", "~data.domains.lcm"], ["sft.recipe='dmt'", "['gcd']"]),
    (["teacher.keep_per_prompt=5"], ["teacher.keep_per_prompt=5 > teacher.n=2"]),
    # mixtures (issue 14): clusters that do not exist, a budget that cannot fill a round, a dev split too small
    (["data.mixture=custom", "data.custom_weights={0: 1.0, 5: 1.0}"],
     ["data.custom_weights: cluster(s) 5 do not exist", "0 .. 2", "data.embed.clusters=3"]),
    (["data.mixture=custom"], ["data.mixture=custom needs data.custom_weights"]),
    (["data.mixture=climb", "data.dev_size=8", "data.climb.budget=2"],
     ["data.climb.budget=2 cannot fill 3 rounds", "[1, 1, 0]"]),
    (["data.mixture=climb"], ["data.dev_size=2 is too small for data.mixture=climb", "at least 8"]),
    (["data.mixture=climb", "data.dev_size=8", "data.climb.ratios=[1,1]"], ["data.climb.ratios has 2 entries"]),
])
def test_every_check_before_compute(overrides, fragments):
    with pytest.raises(ConfigError) as err:
        compose(["experiment=tiny", *overrides])
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)


def test_empty_dict_override_means_empty():
    """Hydra merges `{}` into the dict it replaces; an explicit `{}` empties it (here: no merge parameters)."""
    cfg = compose(["experiment=tiny", "merge=ties", "merge.parameters={}", "++merge.parameters.weight=1.0",
                   "++merge.parameters.density=0.5"])
    assert cfg.merge.parameters == {"weight": 1.0, "density": 0.5}  # normalize and lambda are gone
    assert compose(["experiment=tiny", "merge=ties"]).merge.parameters["lambda"] == 1.0


def test_an_unwritable_cache_folder_does_not_break_validation(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    cache = tmp_path / "file" / "cache"  # cannot be created, not even by root
    monkeypatch.setenv("BRANCHMERGE_CACHE", str(cache))
    from branchmerge.models import cache as cache_module

    cache_module._usable.cache_clear()
    try:
        cfg = compose(["experiment=tiny", "data.domains.gcd.tasks.0.config.max_value=21"])
    finally:
        cache_module._usable.cache_clear()
    assert cfg.data.domains["gcd"].tasks[0].config["max_value"] == 21
    assert not cache.exists()


def test_merge_methods_match_registry():
    from branchmerge.models.merging.registry import method_names
    assert sorted(MERGE_METHODS) == method_names()


# ----------------------------------------------------------------------------------------------- one default

def settings_models():
    from branchmerge.flows.schema import PipelineConfig

    seen, todo = {}, [PipelineConfig]
    while todo:
        model = todo.pop()
        seen[model.__name__] = model
        for field in model.model_fields.values():
            for candidate in (field.annotation, *getattr(field.annotation, "__args__", ())):
                if isinstance(candidate, type) and hasattr(candidate, "model_fields") and candidate.__name__ not in seen:
                    todo.append(candidate)
    return seen


def test_settings_models_have_no_defaults():
    """A default lives in conf/ once: every field of every settings model is required."""
    for name, model in settings_models().items():
        defaulted = [f for f, info in model.model_fields.items() if not info.is_required()]
        assert not defaulted, f"{name} has defaults for {defaulted}: move them to conf/"


def test_no_function_defaults_a_config_key():
    """No function in models/ or tasks/ gives a config key a default of its own (a second default beside conf/);
    functions that take a stage's settings take the settings object."""
    keys = {f for model in settings_models().values() for f in model.model_fields}
    # transformers' attention interface names its argument `dropout` (not sft.lora.dropout)
    interfaces = {("decode_attention", "dropout")}
    offenders = []
    for path in [*ROOT.glob("models/**/*.py"), *ROOT.glob("tasks/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                positional = args.posonlyargs + args.args
                defaulted = positional[len(positional) - len(args.defaults):] + [
                    a for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
                offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {node.name}({a.arg}=...)"
                              for a in defaulted if a.arg in keys and (node.name, a.arg) not in interfaces]
    assert not offenders, offenders


def test_trainers_take_the_settings_object():
    from branchmerge.models.training.grpo import train_grpo
    from branchmerge.models.training.sft import train_sft

    for fn, settings in ((train_sft, "SFTConfig"), (train_grpo, "RLConfig")):
        params = list(inspect.signature(fn).parameters.values())
        assert params[0].name == "cfg" and params[0].annotation == settings
        assert len(params) <= 10, [p.name for p in params]


def test_nightly_data_seed_is_the_date_of_each_run():
    """conf/deploy.yaml registers `data.seed=${today:}` as a literal string; each scheduled run resolves it when
    it composes, so the prompts change night to night."""
    from datetime import date

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from branchmerge.flows.config import CONF_DIR, compose

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        deploy = hydra_compose(config_name="deploy")
    assert "data.seed=${today:}" in list(deploy.overrides)
    today = int(date.today().strftime("%Y%m%d"))
    assert compose(["experiment=tiny", "data.seed=${today:}"]).data.seed == today


def test_form_edits_and_overrides_combine_as_on_the_command_line():
    """The flow's `config` (the form, prefilled with conf/) and `overrides` together: the form's edits apply over
    a group override, a key named in both takes the override's value; the CLI's composed config is kept."""
    from branchmerge.flows.config import as_overrides, compose, resolve

    default = compose([])
    edited = default.model_copy(deep=True)
    edited.teacher.n, edited.merge.parameters, edited.run.name = 3, {"weight": 0.5}, "mine-1"
    assert as_overrides(default.model_dump(mode="json"), edited.model_dump(mode="json")) == [
        "run.name='mine-1'", "teacher.n=3", "merge.parameters.weight=0.5", "~merge.parameters.normalize"]
    cfg = resolve(edited, ["experiment=tiny", "merge.method=ties"], default)
    assert (cfg.student.name, cfg.teacher.n, cfg.merge.method, cfg.merge.parameters, cfg.run.name) == (
        "tiny-llama", 3, "ties", {"weight": 0.5}, "mine-1")
    assert resolve(edited, ["teacher.n=2"], default).teacher.n == 2
    assert resolve(default, ["experiment=tiny"], default) == compose(["experiment=tiny"])
    assert resolve(None, ["merge.method=ties"], default).merge.method == "ties"
    with pytest.raises(ConfigError, match="merge.method='foo'"):
        resolve(default, ["merge.method=foo"], default)


def test_help_lists_groups_and_the_most_used_keys_with_descriptions(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-m", "flows.run", "--help"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr
    assert "merge: dare_ties, linear, recipe, task_arithmetic, ties" in out.stdout
    line = next(x for x in out.stdout.splitlines() if x.strip().startswith("merge.method "))
    assert "mergekit merge method" in line and line.endswith("[linear]")
    assert "== Config ==" not in out.stdout and len(out.stdout.splitlines()) < 60  # no 169-line dump
    assert not list(tmp_path.iterdir())  # no outputs/ folder


def test_run_seed_reaches_an_evaluation_key_only_when_it_samples(tmp_path):
    """Greedy evaluation (eval.n=0) reads no seed: the base model is evaluated once for every seed of a sweep;
    with samples (eval.n > 0) the seed draws them and is in the key."""
    from branchmerge.tasks.registry import dry_run

    def keys(*overrides):
        cfg = compose(["experiment=tiny", f"run.store={tmp_path}", *overrides])
        return {name: job.key for name, (job, _) in dry_run(cfg).items()}

    seed0, seed1 = keys("run.seed=0"), keys("run.seed=1")
    assert seed0["eval/base"] == seed1["eval/base"]
    assert seed0["sft/arithmetic"] != seed1["sft/arithmetic"]  # what the seed does change
    assert keys("run.seed=0", "eval.n=2")["eval/base"] != keys("run.seed=1", "eval.n=2")["eval/base"]
