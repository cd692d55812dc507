"""Run a kernel test file again under Triton's CPU interpreter (TRITON_INTERPRET=1 must be set before import)."""
import os
import subprocess
import sys

from branchmerge.kernels.dispatch import ENV


def rerun_in_triton_interpreter(test_file: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop(ENV, None)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout.splitlines()[-1], run.stdout[-2000:]
