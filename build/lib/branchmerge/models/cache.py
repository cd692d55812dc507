"""The cache folder: derived files that make later runs faster (joined GGUFs, converted tokenizers, the list of
reasoning-gym tasks, accepted task configs). Never needed: an unusable cache costs time, not an error."""
from __future__ import annotations

import json
import logging
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else $BRANCHMERGE_CACHE, else ~/.cache/branchmerge; a process-local temp folder (with one
    warning) when that one cannot be written."""
    root = Path(cache_dir or os.environ.get("BRANCHMERGE_CACHE") or Path.home() / ".cache" / "branchmerge")
    return _usable(root.expanduser())


@lru_cache(maxsize=None)
def _usable(root: Path) -> Path:
    try:
        root.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=root).close()
        return root
    except OSError as err:
        fallback = Path(tempfile.mkdtemp(prefix="branchmerge-cache-"))
        log.warning("cache folder %s is not writable (%s); using %s for this process (set BRANCHMERGE_CACHE)",
                    root, err.strerror or err, fallback)
        return fallback


def cached_json(name: str, compute: Callable[[], Any]) -> Any:
    """compute() memoised as JSON in the cache folder under `name`."""
    path = cache_root() / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    value = compute()
    try:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(value))
        tmp.replace(path)
    except OSError:
        pass
    return value
