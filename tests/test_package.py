"""The installed package: one `branchmerge` namespace (nothing generic at the top of site-packages), conf/ inside
the wheel, the command working from any folder."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # builds the wheel


def test_the_wheel_installs_one_namespace_with_conf_and_runs_from_anywhere(tmp_path):
    source = tmp_path / "source"  # a copy: setuptools writes build/ and *.egg-info into the tree it builds
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "artifacts", "outputs", "multirun",
                                                                "dvc", "mlruns", "*.db", "__pycache__", "build",
                                                                "*.egg-info", ".pytest_cache"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("branchmerge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"branchmerge", wheel.name.split("-")[0] + "-0.1.0.dist-info"}
    assert {"branchmerge/conf/config.yaml", "branchmerge/conf/experiment/tiny.yaml",
            "branchmerge/flows/run.py", "branchmerge/kernels/__init__.py"} <= set(names)
    assert any(n.endswith("dist-info/licenses/LICENSE") or n.endswith("dist-info/LICENSE") for n in names)

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what pip puts into site-packages
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    where = subprocess.run([sys.executable, "-c", "import branchmerge.flows.config as c; print(c.CONF_DIR)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert where.stdout.strip() == str(site / "branchmerge" / "conf"), where.stderr[-2000:]
    for generic in ("flows", "tasks", "models", "kernels"):
        probe = subprocess.run([sys.executable, "-c", f"import {generic}; print({generic}.__file__)"], cwd=elsewhere,
                               env=env, capture_output=True, text=True, timeout=60)
        assert str(site) not in probe.stdout  # not provided by this package
    helped = subprocess.run([sys.executable, "-m", "branchmerge.flows.run", "--help"], cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "experiment: climb_cpu, smollm2_cpu, tiny" in helped.stdout, helped.stderr[-2000:]
    assert not list(elsewhere.iterdir())
