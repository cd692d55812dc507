"""Config composition and validation: typos and bad values fail before any compute, naming key and allowed values."""
import pytest

from flows.config import compose
from flows.schema import ConfigError
from models.merging.config import MERGE_METHODS


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


def test_merge_methods_match_registry():
    from models.merging.registry import method_names
    assert sorted(MERGE_METHODS) == method_names()
