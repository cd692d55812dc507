"""The task-arithmetic family (mergekit's generalized_task_arithmetic.py): one engine, eight methods.

Per tensor, with base b, model i, delta d_i = theta_i - b and weight w_i:
1. sparsify d_i with the method's sparsifier and the model's `density`    -> d_i'
2. weight:                      w_i * d_i'
3. sign consensus (TIES-like):  s = sign(sum_i w_i d_i') (0 -> +1); m_i = [sign(w_i d_i') == s]
                                (zeros never vote); D = sum_i m_i w_i d_i'   (no consensus: m_i = 1)
4. `normalize`:                 D / sum_i m_i w_i   (a zero divisor counts as 1)
5. `lambda`:                    D * lambda;  result b + D
"""

from functools import partial
from typing import Annotated, Callable, Literal

import torch
from pydantic import Field, model_validator

from branchmerge.kernels.merge import sign_elect_disjoint_mean

from . import sparsify as sp
from .base import MergeMethod, Params

Density = Annotated[float, Field(gt=0, le=1)]


class TaskArithmeticModel(Params):
    weight: float
    density: Density = 1.0


class BreadcrumbsModel(TaskArithmeticModel):
    gamma: Annotated[float, Field(ge=0, lt=1)] = 0.01


class DellaModel(TaskArithmeticModel):
    epsilon: Annotated[float, Field(ge=0, lt=1)] = 0.15

    @model_validator(mode="after")
    def _probabilities_in_range(self):
        if self.density < 1 and not (0 < self.density - self.epsilon and self.density + self.epsilon < 1):
            raise ValueError(
                f"density +/- epsilon must lie in (0, 1) (keep probabilities); "
                f"got density={self.density}, epsilon={self.epsilon}"
            )
        return self


class TaskArithmeticParams(Params):
    normalize: bool = False
    rescale: bool = False
    # How `rescale` restores the size of a sparsified delta: mergekit's L1-norm match (default), or
    # the DARE / DELLA papers' division by the keep probability.
    rescale_mode: Literal["l1", "inverse_p"] = "l1"
    lambda_: float = Field(1.0, alias="lambda")
    int8_mask: bool = False  # accepted for mergekit configs; only changes mergekit's mask memory


class TiesParams(TaskArithmeticParams):
    normalize: bool = True
    # "tensor": mergekit's trim (each tensor keeps `density` of its entries); "model": the TIES paper's
    # (each model keeps its top `density` over all its parameters; run_merge ranks them, global_trim.py).
    trim_scope: Literal["tensor", "model"] = "tensor"


class DareParams(TaskArithmeticParams):
    rescale: bool = True


class DellaParams(TaskArithmeticParams):
    normalize: bool = True
    rescale: bool = True


# Sparsifiers: (delta, model params, global params, generator) -> sparsified delta.
Sparsifier = Callable[[torch.Tensor, TaskArithmeticModel, TaskArithmeticParams, torch.Generator], torch.Tensor]


def _rescale(p: TaskArithmeticParams) -> sp.Rescale:
    return p.rescale_mode if p.rescale else None


def _magnitude(d, m, p, g):
    return sp.magnitude(d, m.density, _rescale(p))


def _random(d, m, p, g):
    return sp.bernoulli(d, m.density, g, _rescale(p))


def _magnitude_outliers(d, m, p, g):
    return sp.magnitude_outliers(d, m.density, m.gamma, _rescale(p))


def _della_magprune(d, m, p, g):
    return sp.della_magprune(d, m.density, m.epsilon, g, _rescale(p))


def generalized_task_arithmetic(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    models: list[TaskArithmeticModel],
    p: TaskArithmeticParams,
    generator: torch.Generator,
    *,
    sparsifier: Sparsifier | None,
    consensus: bool,
) -> torch.Tensor:
    if not tensors:
        return base
    deltas = torch.stack([
        sparsifier(t - base, m, p, generator) if sparsifier else t - base for t, m in zip(tensors, models)
    ])
    # Steps 2-5 in one call: a fused Triton kernel on CUDA, elsewhere the PyTorch reference (the same ops,
    # weighting the stack in place). kernels/merge.py; BRANCHMERGE_KERNELS=reference|triton forces one.
    return sign_elect_disjoint_mean(base, deltas, [m.weight for m in models], consensus=consensus,
                                    normalize=p.normalize, lambda_=p.lambda_, overwrite_deltas=True)


#       name               sparsifier           consensus  global params          per-model params     reference
FAMILY = [
    ("task_arithmetic", None, False, TaskArithmeticParams, TaskArithmeticModel, "arxiv.org/abs/2212.04089"),
    ("ties", _magnitude, True, TiesParams, TaskArithmeticModel, "arxiv.org/abs/2306.01708"),
    ("dare_linear", _random, False, DareParams, TaskArithmeticModel, "arxiv.org/abs/2311.03099"),
    ("dare_ties", _random, True, DareParams, TaskArithmeticModel, "arxiv.org/abs/2311.03099"),
    ("breadcrumbs", _magnitude_outliers, False, TaskArithmeticParams, BreadcrumbsModel, "arxiv.org/abs/2312.06795"),
    ("breadcrumbs_ties", _magnitude_outliers, True, TaskArithmeticParams, BreadcrumbsModel, "arxiv.org/abs/2312.06795"),
    ("della", _della_magprune, True, DellaParams, DellaModel, "arxiv.org/abs/2406.11617"),
    ("della_linear", _della_magprune, False, DareParams, DellaModel, "arxiv.org/abs/2406.11617"),
]

# This family's methods; models/merging/registry.py lists every family.
METHODS = [
    MergeMethod(name=name, fn=partial(generalized_task_arithmetic, sparsifier=sparsifier, consensus=consensus),
                params=params, model_params=model_params, base="required", reference=ref)
    for name, sparsifier, consensus, params, model_params, ref in FAMILY
]
