"""Smoke tests: every example in examples/ runs to completion on a CPU (each asserts its own results)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# What each example prints once its own checks (exact logit equality, equal weights) have passed.
LAST_LINES = {
    "quickstart.py": "reloaded export vs fake-quantized model: max |logit diff| = 0.0",
    "modelopt_export.py": "reloaded export vs ModelOpt fake-quantized model: max |logit diff| = 0.0",
    "compressed_tensors_export.py": "reloaded export vs compressed-tensors model: max |logit diff| = 0.0",
    "toolkit_integration.py": "tinyq int8 weights x scales == save_clean's folded weights",
}


@pytest.fixture(scope="module")
def runs() -> dict[str, subprocess.Popen]:
    """All examples started at once: most of each one's time is importing torch and transformers."""
    procs = {name: subprocess.Popen([sys.executable, str(EXAMPLES / name)], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, cwd=EXAMPLES.parent)
             for name in LAST_LINES}
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("name", sorted(LAST_LINES))
def test_example_runs(runs, name):
    stdout, stderr = runs[name].communicate(timeout=600)
    assert runs[name].returncode == 0, f"{name} failed:\n{stdout}\n{stderr}"
    assert stdout.rstrip().splitlines()[-1] == LAST_LINES[name]
