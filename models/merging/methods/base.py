"""What a merge method is: one function over tensors plus pydantic parameter schemas (registry.py lists them).

Like mergekit, a method is found by its name (`merge_method: ties`) and declares its parameters with
mergekit's names and defaults. Parameters come in two scopes:

- `params`: global, one value per tensor (`normalize`, `lambda`, slerp's `t`, ...);
- `model_params`: one value per input model and tensor (`weight`, `density`, ...).

A method function has one signature for all methods:

    fn(base, tensors, models, params, generator) -> merged tensor

`base` is the base model's tensor (None for methods that do not use a base), `tensors` the other
inputs in config order, `models[i]` the validated `model_params` of `tensors[i]`, `params` the
validated global parameters, and `generator` a torch.Generator seeded from the merge seed and the
tensor name (only the random methods use it). All tensors arrive in the compute dtype.
Adding a method = one function + its schemas in its family's module's METHODS list (registry.py lists families).
"""

from dataclasses import dataclass
from functools import cache
from typing import Any, Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from ..config import MergeConfigError

MergeFn = Callable[[torch.Tensor | None, list[torch.Tensor], list[Any], Any, torch.Generator], torch.Tensor]


class Params(BaseModel):
    """Base of every parameter schema: unknown names are errors; `lambda` is given by its alias."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class NoParams(Params):
    pass


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: MergeFn
    params: type[Params] = NoParams  # global parameters
    model_params: type[Params] = NoParams  # per input model
    # "required": the base is separated out and passed as `base`; "ignored": every input is in
    # `tensors` (mergekit still adds a base_model that is not listed under models as an input).
    # "optional" (nuslerp, multislerp): works on deltas from a base when one is given, on the models otherwise.
    base: Literal["required", "optional", "ignored"] = "ignored"
    min_inputs: int = 1  # counting the base
    max_inputs: int | None = None
    models_besides_base: int | None = None  # an exact count of non-base models (nuslerp: 2), base or not
    # Cross-model checks that a single model's schema cannot express (e.g. linear's weight sum);
    # run per tensor while planning, before any weight is read. Raise ValueError.
    check: Callable[[Any, list[Any]], None] | None = None
    reference: str = ""
    # The dtype the method returns for inputs of a dtype, which a merge without out_dtype writes (mergekit saves
    # what the method returns): arcee_fusion's float32 mask and RAM+'s float32 lambda make bf16 inputs float32.
    result_dtype: Callable[[torch.dtype], torch.dtype] = lambda dtype: dtype

    def global_names(self) -> list[str]:
        return parameter_names(self.params)

    def model_names(self) -> list[str]:
        return parameter_names(self.model_params)

    def __call__(
        self,
        base: torch.Tensor | None,
        tensors: list[torch.Tensor],
        *,
        models: list[dict] | None = None,
        params: dict | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Merge plain tensors with plain-dict parameters (library use and tests); validates like a config."""
        models = [self.model_params(**m) for m in (models or [{} for _ in tensors])]
        if len(models) != len(tensors):
            raise ValueError(f"{self.name}: got {len(tensors)} tensors but {len(models)} model parameter dicts")
        p = self.params(**(params or {}))
        if self.check is not None:
            self.check(p, models)
        if self.base == "required" and base is None:
            raise ValueError(f"{self.name} needs a base tensor")
        # A fresh default-seeded generator keeps direct calls deterministic when none is given.
        return self.fn(base, list(tensors), models, p, generator if generator is not None else torch.Generator())


def parameter_names(schema: type[BaseModel]) -> list[str]:
    return [f.alias or n for n, f in schema.model_fields.items()]


def required_names(schema: type[BaseModel]) -> list[str]:
    return [f.alias or n for n, f in schema.model_fields.items() if f.is_required()]


@cache
def _adapter(schema: type[BaseModel], name: str) -> TypeAdapter:
    for n, f in schema.model_fields.items():
        if (f.alias or n) == name:
            # The field's type plus its constraints (Field(gt=0) lands in f.metadata).
            return TypeAdapter(f.rebuild_annotation())
    raise KeyError(name)


def validate_value(schema: type[BaseModel], name: str, value: Any, where: str) -> Any:
    """One scalar value of parameter `name`, checked against the schema's type and bounds."""
    try:
        return _adapter(schema, name).validate_python(value)
    except ValidationError as e:
        msg = "; ".join(err["msg"] for err in e.errors())
        raise MergeConfigError(f"{where}: {msg} (got {value!r})") from None


def describe(schema: type[BaseModel]) -> str:
    """'weight (required), density (default 1.0)': the schema in one line, for error messages."""
    parts = []
    for n, f in schema.model_fields.items():
        default = "required" if f.is_required() else f"default {f.default!r}"
        parts.append(f"{f.alias or n} ({default})")
    return ", ".join(parts) or "none"
