"""Every code block of README.md runs as written, in document order, in one empty directory.

``python`` blocks run in one namespace, one after the other. ``bash`` / ``sh`` blocks run line by line:
``offload-export ...`` lines through the command line's ``main`` (in this process: the same code as the console
script, without paying the interpreter's start-up per line), other lines with bash. Two kinds of lines are
skipped: ``pip install ...`` (they change the environment the tests run in) and ``python -m pytest ...`` (the
test suite itself). CI runs both exactly as written (``.ci/run``).
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from offload_export.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.S | re.M)
SKIPPED = ("pip install ", "python -m pytest")


def blocks() -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block of README.md."""
    return [(lang.strip(), code) for lang, code in FENCE.findall(README.read_text())]


def test_readme_has_only_runnable_blocks():
    languages = {lang for lang, _ in blocks()}
    assert languages <= {"python", "bash", "sh"}, languages  # an unlabelled block would go untested
    assert {"python", "bash"} <= languages


def _run_shell_line(line: str, capsys) -> None:
    if line.startswith("offload-export "):
        try:
            code = main(shlex.split(line)[1:])
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        assert code == 0, f"{line}\n{out}\n{err}"
    else:
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", line], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{line}\n{result.stdout}\n{result.stderr}"


def test_readme_blocks_run_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    ran = 0
    for i, (lang, code) in enumerate(blocks()):
        if lang == "python":
            exec(compile(code, f"README.md block {i}", "exec"), namespace)
            capsys.readouterr()
            ran += 1
            continue
        for line in code.splitlines():
            line = line.split(" #")[0].strip()  # a trailing comment is prose
            if line and not line.startswith("#") and not line.startswith(SKIPPED):
                _run_shell_line(line, capsys)
                ran += 1
    assert ran >= 6
    # What the blocks promise they wrote.
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "my-model-w4" / "config.json").is_file()
    assert (tmp_path / "tiny-int8" / "quantizer_state.safetensors").is_file()


def test_ci_runs_the_skipped_lines_exactly():
    """The lines skipped here (install, test suite) are the ones CI runs, word for word."""
    ci = (README.parent / ".ci" / "run").read_text()
    skipped = [line.strip() for lang, code in blocks() if lang != "python" for line in code.splitlines()
               if line.strip().startswith(SKIPPED)]
    assert len(skipped) >= 3
    for line in skipped:
        assert line in ci, line
