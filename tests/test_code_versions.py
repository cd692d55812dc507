"""Code versions come from the real import closure: editing a file a stage runs changes that stage's key and every
key downstream of it; editing what no stage runs (bench/, the README) changes none. Edits happen in a temp copy."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from branchmerge.tasks.code import closure, code_version
from branchmerge.tasks.registry import STAGES

ROOT = Path(__file__).resolve().parent.parent
CODE = ("flows", "tasks", "models", "kernels", "conf", "bench")


@pytest.fixture
def copy(tmp_path):
    repo = tmp_path / "repo"
    for name in CODE:
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "README.md", repo / "README.md")
    return repo


def edit(path: Path) -> None:
    with open(path, "a") as f:
        f.write("\n# edited\n")


def versions(root: Path) -> dict[str, str]:
    closure.cache_clear()
    code_version.cache_clear()
    return {stage.name: code_version(stage.module.__name__, root) for stage in STAGES}


@pytest.mark.slow
def test_editing_any_file_of_a_stages_closure_changes_its_version_and_only_theirs(copy):
    before = versions(copy)
    assert before == versions(ROOT)  # the version is the code's, not the folder's
    files = sorted({p.relative_to(copy) for stage in STAGES for p in closure(stage.module.__name__, copy)})
    assert Path("models/merging/checkpoint.py") in files and Path("kernels/merge.py") in files
    for rel in files:
        edit(copy / rel)
        after = versions(copy)
        changed = {s for s in before if after[s] != before[s]}
        runs_it = {s.name for s in STAGES if copy / rel in closure(s.module.__name__, copy)}
        assert changed == runs_it and changed, rel
        before = after


@pytest.mark.parametrize("rel, must_change", [
    ("models/training/toolkit.py", {"sft", "rl"}),  # rl's old hand-kept list missed the SFT helpers it runs
    ("models/merging/checkpoint.py", {"merge"}),   # the merge's old list missed its reader and writer
    ("kernels/merge.py", {"merge"}),               # ... and its kernels
    ("models/lm/hf.py", {"model", "teacher", "eval", "sft", "rl"}),  # teacher and eval missed the loader
])
def test_the_files_the_old_hand_kept_lists_missed(copy, rel, must_change):
    before = versions(copy)
    edit(copy / rel)
    after = versions(copy)
    assert must_change <= {s for s in before if after[s] != before[s]}


def planned_keys(repo: Path, store: Path) -> dict[str, str]:
    """The plan of the copy's code: `branchmerge.*` made to resolve to the copy's folders (the installed, editable
    package points at the checkout)."""
    package = repo.parent / "importable" / "branchmerge"
    if not package.exists():
        package.mkdir(parents=True)
        for name in ("flows", "tasks", "models", "kernels", "conf"):
            (package / name).symlink_to(repo / name)
    proc = subprocess.run([sys.executable, "-m", "branchmerge.flows.stage", "plan", "--json", "experiment=tiny",
                           f"run.store={store}"], cwd=repo, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(package.parent)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: plan["key"] for name, plan in json.loads(proc.stdout.splitlines()[-1]).items()}


@pytest.mark.slow
def test_an_edit_changes_the_keys_downstream_and_bench_or_readme_change_none(copy, tmp_path):
    store = tmp_path / "store"
    before = planned_keys(copy, store)
    edit(copy / "bench" / "merge_vs_mergekit.py")
    edit(copy / "README.md")
    assert planned_keys(copy, store) == before
    edit(copy / "models" / "merging" / "methods" / "sce.py")  # the merge runs it: merge and what follows
    after = planned_keys(copy, store)
    assert {n for n in before if after[n] != before[n]} == {"merge", "rl/grpo", "eval/merged", "eval/rl", "report"}
