"""TIES with the paper's whole-model trim (`trim_scope: model`) against a reference that ranks every delta at once."""

import pytest
import torch

from branchmerge.models.merging.checkpoint import Checkpoint
from branchmerge.models.merging.config import MergeConfigError
from branchmerge.models.merging.global_trim import kept_counts
from branchmerge.models.merging.run import run_merge
from tests.test_merge import ref_combine, tiny_llama, weights


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("trim_models")
    base = tiny_llama(root / "base", 0)
    # Different noise per tensor size, so a whole-model trim keeps different fractions per tensor.
    return {"base": base, "a": tiny_llama(root / "a", 1, like=base, noise=0.05),
            "b": tiny_llama(root / "b", 2, like=base, noise=0.2)}


def global_masks(base, model, density):
    """Reference: the k = int(density * N) largest |delta| over all N entries of the model, ties kept."""
    deltas = {k: (model[k] - base[k]) for k in base if base[k].is_floating_point()}
    flat = torch.cat([d.abs().reshape(-1) for d in deltas.values()])
    k = int(density * flat.numel())
    threshold = torch.topk(flat, k).values[-1]
    return {name: d.abs() >= threshold for name, d in deltas.items()}


@pytest.mark.parametrize("density", [0.01, 0.3, 0.9])
def test_kept_counts_equal_a_whole_model_ranking(zoo, density):
    base, a = weights(zoo["base"]), weights(zoo["a"])
    ref = global_masks(base, a, density)
    names = [(n, n, n) for n in ref]
    counts = kept_counts(Checkpoint(zoo["a"]), Checkpoint(zoo["base"]), names, density)
    assert counts == {n: int(m.sum()) for n, m in ref.items()}
    assert sum(counts.values()) == int(density * sum(m.numel() for m in ref.values()))  # no ties at the cut here
    fractions = {n: counts[n] / ref[n].numel() for n in ref}
    # not the per-tensor trim in disguise: some tensors keep clearly more or less than `density`
    assert any(abs(f - density) > 0.2 * min(density, 1 - density) for f in fractions.values())


def test_ties_with_model_scope_equals_the_paper_formula(zoo, tmp_path):
    config = {"merge_method": "ties", "base_model": str(zoo["base"]),
              "models": [{"model": str(zoo["a"]), "parameters": {"weight": 1.0, "density": 0.2}},
                         {"model": str(zoo["b"]), "parameters": {"weight": 1.0, "density": 0.4}}],
              "parameters": {"trim_scope": "model"}}
    run_merge(config, tmp_path / "out", seed=0)
    base, a, b, out = (weights(zoo[k]) if k != "out" else weights(tmp_path / "out") for k in ("base", "a", "b", "out"))
    masks = [global_masks(base, a, 0.2), global_masks(base, b, 0.4)]
    for name, tensor in out.items():
        trimmed = [(m[name] * (x[name] - base[name])) for m, x in zip(masks, (a, b))]
        # weights 1 + normalize: the paper's disjoint mean over agreeing, kept entries
        torch.testing.assert_close(tensor, ref_combine(base[name], trimmed, [1.0, 1.0], consensus=True, normalize=True),
                                   msg=name)


def test_model_scope_needs_one_density_per_model(zoo, tmp_path):
    config = {"merge_method": "ties", "base_model": str(zoo["base"]),
              "models": [{"model": str(zoo["a"]), "parameters": {"weight": 1.0, "density": [0.2, 0.5]}}],
              "parameters": {"trim_scope": "model"}}
    with pytest.raises(MergeConfigError, match=r"models\[0\]\.parameters\.density: trim_scope: model ranks the whole "
                                               r"model with one density; got"):
        run_merge(config, tmp_path / "out", seed=0)
    assert not (tmp_path / "out").exists()
