"""The base of every stage's settings model (models/*/config.py): pydantic, strict about keys, no torch.

Field names equal the conf/ keys and the attributes the code reads; defaults live in conf/, never here, so every
field is required and a config that forgot a key fails loudly instead of silently taking a second default.
"""
from pydantic import BaseModel, ConfigDict


class Settings(BaseModel):
    # use_attribute_docstrings: the string under each field is its description (Prefect UI form, --help).
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
