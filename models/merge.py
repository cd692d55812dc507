"""Model merging: re-exports models.merging (method registry, value resolver, run_merge)."""

from models.merging import *  # noqa: F401,F403
from models.merging import __all__  # noqa: F401
