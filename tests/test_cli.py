"""The ``offload-export`` command on real checkpoints (built from a config, saved to disk).

The entry points (``offload-export``, ``python -m offload_export``) run as subprocesses; most other cases
call ``cli.main(argv)`` in-process, the same code without paying ~5 s of interpreter and import start-up
each.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import offload_export as oe
from offload_export.cli import main
from offload_export.demo import build_checkpoint

SCRIPT = Path(sys.executable).parent / "offload-export"
CLI = [sys.executable, "-m", "offload_export"]


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def _main(capsys, *args: str) -> tuple[int, str, str]:
    """``cli.main`` in-process: (exit code, stdout, stderr), argparse's exits included."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("model*.safetensors")):
        with safe_open(file, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "tiny"
    build_checkpoint(path, "tiny")
    return path


def _check_demo(stdout: str, out: Path, layout: str, kinds: set[str]) -> None:
    layout_line = next(line for line in stdout.splitlines() if line.startswith(f"layout ({layout}):"))
    assert {part.split()[0] for part in layout_line.partition(": ")[2].split(", ")} == kinds
    assert "max |logit diff| vs the fake-quantized model = 0 " in stdout
    assert stdout.rstrip().endswith("reproduces the fake-quantized model exactly")
    assert {"config.json", "model.safetensors", "quantizer_state.safetensors"} <= {p.name for p in out.iterdir()}
    assert "auto_map" not in json.loads((out / "config.json").read_text())


def test_console_script_demo_mixed_layout(tmp_path):
    out = tmp_path / "export"
    result = subprocess.run([str(SCRIPT), "demo", "--layout", "mixed", "--scheme", "nvfp4", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    _check_demo(result.stdout, out, "mixed", {"resident", "cpu", "disk", "tied"})


@pytest.mark.parametrize("layout, scheme, kinds", [
    ("cpu", "int8", {"resident", "cpu", "tied"}),
    ("disk", "fp8", {"resident", "safetensors", "tied"}),
])
def test_demo_verifies_other_layouts(capsys, tmp_path, layout, scheme, kinds):
    code, stdout, stderr = _main(capsys, "demo", "--layout", layout, "--scheme", scheme, "--out", tmp_path / "o")
    assert code == 0, stderr
    _check_demo(stdout, tmp_path / "o", layout, kinds)


def test_demo_quiet_prints_nothing(capsys, tmp_path):
    code, stdout, stderr = _main(capsys, "demo", "--quiet", "--scheme", "int4-g128", "--out", tmp_path / "o")
    assert (code, stdout, stderr) == (0, "", "")
    assert (tmp_path / "o" / "model.safetensors").is_file()


def test_export_under_memory_caps_offloads_and_folds(tmp_path, checkpoint):
    out = tmp_path / "int8"
    result = _run("export", checkpoint, out, "--scheme", "int8", "--max-memory", "cpu=1MB",
                  "--offload-folder", tmp_path / "offload", "--max-shard-size", "1MB")
    assert result.returncode == 0, result.stderr
    assert "safetensors" in result.stdout.splitlines()[0]  # what did not fit under 1MB was left on disk
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    source, exported = _tensors(checkpoint), _tensors(out)
    assert sorted(exported) == sorted(source)  # same names as the source: tied lm_head written once
    for key, weight in source.items():
        if key.endswith("proj.weight"):  # every Linear but lm_head is folded, bit for bit
            quantizer = oe.FakeQuantizer("int8", tuple(weight.shape))
            quantizer.calibrate(weight)
            expected = quantizer(weight)
        else:
            expected = weight
        assert exported[key].dtype == weight.dtype and torch.equal(exported[key], expected), key


def test_export_without_scheme_copies_weights_exactly(capsys, tmp_path, checkpoint):
    assert _main(capsys, "export", checkpoint, tmp_path / "copy", "--quiet") == (0, "", "")
    source, exported = _tensors(checkpoint), _tensors(tmp_path / "copy")
    assert sorted(exported) == sorted(source)
    assert all(torch.equal(exported[k], v) for k, v in source.items())
    assert not (tmp_path / "copy" / "quantizer_state.safetensors").exists()


def test_verify_accepts_its_export_and_rejects_another_scheme(capsys, tmp_path, checkpoint):
    assert _main(capsys, "export", checkpoint, tmp_path / "q", "--scheme", "int8", "--quiet") == (0, "", "")
    code, stdout, stderr = _main(capsys, "verify", checkpoint, tmp_path / "q", "--scheme", "int8",
                                 "--max-memory", "cpu=1MB")
    assert code == 0 and "VerifyReport" in stdout and ": OK" in stdout, stderr
    code, stdout, stderr = _main(capsys, "verify", checkpoint, tmp_path / "q", "--scheme", "fp8", "--quiet")
    _check_error("verify --scheme fp8", "differs from", code, stdout, stderr)
    # 21 tensors + quantizer_state.safetensors' metadata (each quantizer's configuration: fp8, not int8) + the 3
    # weights that verify's second opinion recomputes through their quantizer's own forward
    assert "25 mismatch(es), first: model.layers.0.self_attn.q_proj.weight" in stderr


def test_layout_prints_where_each_weight_lives(capsys, checkpoint):
    code, stdout, stderr = _main(capsys, "layout", checkpoint, "--max-memory", "cpu=1MB")
    assert code == 0, stderr
    rows = {line.split()[0]: line.split()[1] for line in stdout.splitlines()[1:-1]}
    assert rows["lm_head.weight"] == "tied"
    assert rows["model.layers.2.mlp.down_proj.weight"] == "safetensors"
    assert stdout.splitlines()[-1].startswith("-- 36 entries")


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, checkpoint) -> list[tuple[list[str], str]]:
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "not-a-checkpoint").mkdir()
    (tmp / "full").mkdir()
    (tmp / "full" / "keep.txt").write_text("user data\n")
    return [
        (["export", tmp / "missing", tmp / "o"], "missing: no such directory"),
        (["export", tmp / "not-a-checkpoint", tmp / "o"], "not a Hugging Face checkpoint (no config.json)"),
        (["export", checkpoint, tmp / "full"], "is not empty"),
        (["export", checkpoint, tmp / "o", "--scheme", "int3"], "invalid choice: 'int3'"),
        (["export", checkpoint, tmp / "o", "--max-memory", "cpu=lots"], "'cpu=lots': size 'lots' is not a size"),
        (["export", checkpoint, tmp / "o", "--max-memory", "4GiB"], "expected DEVICE=SIZE"),
        (["export", checkpoint, tmp / "o", "--max-memory", "gpu=4GiB"], "device 'gpu' must be"),
        (["export", checkpoint, tmp / "o", "--max-shard-size", "big"], "'big' is not a size"),
        (["export", checkpoint, tmp / "o", "--dtype", "int7"], "invalid choice: 'int7'"),
        (["layout", tmp / "missing"], "no such directory"),
        (["verify", checkpoint, tmp / "missing"], "missing: no such directory"),
        (["demo", "--out", tmp / "full"], "is not empty"),
        (["demo", "--layout", "gpu"], "invalid choice: 'gpu'"),
        (["demo", "--size", "huge"], "invalid choice: 'huge'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required: COMMAND"),
    ]


def _check_error(args, fragment: str, code: int, stdout: str, stderr: str) -> None:
    assert code != 0, args
    assert stderr.count("\n") == 1 and stderr.startswith("offload-export: error: "), (args, stderr)
    assert fragment in stderr, (args, stderr)
    assert "Traceback" not in stderr and stdout == "", args


def test_bad_input_in_a_real_process_is_one_line_error(bad_inputs):
    procs = [(args, fragment, subprocess.Popen([*CLI, *map(str, args)], stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE, text=True))
             for args, fragment in (bad_inputs[2], bad_inputs[4])]  # a runtime check and a parse error
    for args, fragment, proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        _check_error(args, fragment, proc.returncode, stdout, stderr)
    assert (bad_inputs[2][0][2] / "keep.txt").read_text() == "user data\n"  # a refused destination is untouched


def test_every_bad_input_is_one_line_error(capsys, bad_inputs):
    for args, fragment in bad_inputs:
        _check_error(args, fragment, *_main(capsys, *args))


def test_help_lists_commands_and_examples(capsys):
    code, stdout, _ = _main(capsys, "--help")
    assert code == 0
    for text in ("demo", "export", "layout", "examples:", "offload-export demo --size small"):
        assert text in stdout


def test_export_onto_its_own_source_is_refused_before_loading(tmp_path, capsys):
    src = tmp_path / "src"
    build_checkpoint(src, "tiny")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    assert main(["export", str(src), str(src), "--overwrite", "--quiet"]) == 1
    assert "model reads its offloaded weights from" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
