"""The ``offload-export`` command on real checkpoints (built from a config, saved to disk).

The entry points (``offload-export``, ``python -m offload_export``) run as subprocesses; most other cases
call ``cli.main(argv)`` in-process, the same code without paying ~5 s of interpreter and import start-up
each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import offload_export as oe
from offload_export.cli import build_parser, main
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


def test_verify_reads_scheme_and_format_from_the_export_and_hints_when_asked_otherwise(capsys, tmp_path, checkpoint):
    assert _main(capsys, "export", checkpoint, tmp_path / "q", "--scheme", "int8", "--quiet") == (0, "", "")
    code, stdout, stderr = _main(capsys, "verify", checkpoint, tmp_path / "q", "--max-memory", "cpu=1MB")
    assert code == 0 and "quantized 21 linear weights (int8)" in stdout and ": OK" in stdout, stderr
    code, stdout, stderr = _main(capsys, "verify", checkpoint, tmp_path / "q", "--scheme", "fp8", "--quiet")
    _check_error("verify --scheme fp8", "differs from", code, stdout, stderr)
    # 21 tensors + quantizer_state.safetensors' metadata (each quantizer's configuration: fp8, not int8) + the 3
    # weights that verify's second opinion recomputes through their quantizer's own forward
    assert "25 mismatch(es), first: model.layers.0.self_attn.q_proj.weight" in stderr
    assert "records --scheme int8 --format fake-quant, you asked for --scheme fp8" in stderr


def test_layout_prints_where_each_weight_lives(capsys, checkpoint):
    code, stdout, stderr = _main(capsys, "layout", checkpoint, "--max-memory", "cpu=1MB")
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert lines[0].split()[5] == "MiB"  # sizes are in 2**20 bytes, and say so
    rows = {line.split()[0]: line.split() for line in lines[1:-1]}
    assert rows["lm_head.weight"][1] == "tied"
    assert rows["model.layers.2.mlp.down_proj.weight"][1] == "safetensors"
    assert rows["model.embed_tokens.weight"][5] == f"{4096 * 128 * 2 / 2**20:.2f}"
    assert lines[-1].startswith("-- 36 entries") and " MiB" in lines[-1]


def test_max_memory_before_src_takes_one_value(capsys, tmp_path, checkpoint):
    """``--max-memory`` takes one DEVICE=SIZE[,...] per use: the positional arguments after it stay positional."""
    code, stdout, stderr = _main(capsys, "export", "--max-memory", "cpu=1MB", checkpoint, tmp_path / "o",
                                 "--scheme", "int8")
    assert code == 0, stderr
    assert "safetensors" in stdout.splitlines()[0]  # the cap applied: what did not fit stays on disk
    args = build_parser().parse_args(["layout", "--max-memory", "0=20GiB,cpu=1.5GB", "--max-memory", "1=2MB", "src"])
    assert (args.src, args.max_memory) == ("src", [[(0, 20 * 2**30), ("cpu", 1_500_000_000)], [(1, 2_000_000)]])


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
        (["export", checkpoint, tmp / "o", "--max-shard-size", "9" * 400], "is not a size like 5GB"),
        (["export", checkpoint, tmp / "o", "--max-shard-size", "1" * 400 + ".5GB"], "is not a size like 5GB"),
        (["export", checkpoint, tmp / "o", "--max-memory", "cpu=" + "9" * 400], "is not a size like 4GiB"),
        (["export", checkpoint, tmp / "o", "--max-memory", "cpu=1GB,gpu=1GB"], "device 'gpu' must be"),
        (["export", checkpoint, tmp / "o", "--format", "modelopt"], "--format modelopt packs quantized weights"),
        (["export", checkpoint, tmp / "o", "--format", "modelopt", "--scheme", "nvfp4"],
         "quantize with modelopt.torch.quantization in Python"),
        (["export", checkpoint, tmp / "full"], "pass --overwrite to replace it"),
        (["export", checkpoint, tmp / "o", "--dtype", "int7"], "invalid choice: 'int7'"),
        (["layout", tmp / "missing"], "no such directory"),
        (["verify", checkpoint, tmp / "missing"], "missing: no such directory"),
        (["demo", "--out", tmp / "full"], "is not empty; pass --overwrite"),
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


def test_help_and_version_import_neither_torch_nor_transformers():
    code = ("import sys\nfrom offload_export.cli import main\n"
            "for argv in (['--help'], ['--version'], ['export', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0, e\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules)\n"
            "print('imported:', heavy)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"offload-export {oe.__version__}" in result.stdout
    assert result.stdout.rstrip().endswith("imported: []")


def test_cli_choices_are_the_package_registries():
    from offload_export import cli
    from offload_export.demo import LAYOUTS, SIZES
    from offload_export.formats import FORMATS

    assert cli.SCHEMES == oe.SCHEMES and cli.FORMATS == tuple(FORMATS)
    assert (cli._LAYOUTS, cli._SIZES) == (LAYOUTS, tuple(SIZES))


def test_extras_declare_the_supported_toolkit_releases():
    import configparser

    from offload_export.toolkits import TOOLKITS

    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parent.parent / "setup.cfg")
    extras = {k: v.split() for k, v in cfg["options.extras_require"].items()}
    for toolkit in TOOLKITS.values():
        assert toolkit.requirement in extras[toolkit.extra], toolkit
        assert toolkit.requirement in extras["test"], toolkit


def _damaged(tmp_path: Path, source: Path, what: str) -> Path:
    """A copy of ``source`` with one tensor removed, one added, or its weights file cut in half."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / what
    out.mkdir()
    for f in source.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    tensors = load_file(out / "model.safetensors")
    if what == "missing":
        del tensors["model.layers.1.mlp.up_proj.weight"]
    elif what == "unexpected":
        tensors["model.layers.1.mlp.extra.weight"] = torch.zeros(2, 2, dtype=torch.bfloat16)
    if what == "truncated":
        data = (out / "model.safetensors").read_bytes()
        (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    else:
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("what, fragment", [
    ("missing", "1 missing weight(s): model.layers.1.mlp.up_proj.weight;"),
    ("unexpected", "1 unexpected weight(s): model.layers.1.mlp.extra.weight;"),
    ("truncated", "a weights file cannot be read"),
])
def test_a_checkpoint_that_does_not_load_whole_is_refused(capsys, tmp_path, checkpoint, what, fragment):
    src = _damaged(tmp_path, checkpoint, what)
    for args in (["export", src, tmp_path / "o", "--scheme", "int8"], ["layout", src]):
        _check_error(args, fragment, *_main(capsys, *args))
    assert not (tmp_path / "o").exists()


def test_a_checkpoint_that_is_not_a_causal_lm_is_refused_before_loading(capsys, tmp_path):
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        vocab_size=128)
    BertModel(config).save_pretrained(tmp_path / "bert")
    _check_error("bert", "architecture BertModel is not a causal language model",
                 *_main(capsys, "export", tmp_path / "bert", tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def _fake_distribution(root: Path, module: str, distribution: str, version: str) -> Path:
    """An installed (importable) ``distribution`` of ``version``, found by importlib.metadata like a real one."""
    (root / module).mkdir(parents=True)
    (root / module / "__init__.py").write_text("")
    info = root / f"{distribution.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
    return root


@pytest.mark.parametrize("fmt, module, distribution, version, required", [
    ("compressed-tensors", "compressed_tensors", "compressed-tensors", "0.18.0", "compressed-tensors>=0.19,<0.21"),
    ("modelopt", "modelopt", "nvidia-modelopt", "0.45.0", "nvidia-modelopt>=0.46.1,<0.48"),
])
def test_an_unsupported_toolkit_release_is_refused_before_loading(tmp_path, checkpoint, fmt, module, distribution,
                                                                   version, required):
    site = _fake_distribution(tmp_path / "site", module, distribution, version)
    env = {**os.environ, "PYTHONPATH": f"{site}:{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([*CLI, "export", str(checkpoint), str(tmp_path / "o"), "--scheme", "int8", "--format", fmt],
                            capture_output=True, text=True, timeout=120, env=env)
    _check_error(fmt, f"needs {required}, but {distribution} {version} is installed: "
                      f'pip install "offload_export[{fmt}]"', result.returncode, result.stdout, result.stderr)


def test_a_missing_toolkit_is_one_line_naming_the_extra(tmp_path, checkpoint):
    code = ("import sys\n"
            "class Absent:\n    @staticmethod\n    def find_spec(name, *a):\n"
            "        if name.split('.')[0] == 'compressed_tensors':\n            raise ModuleNotFoundError(name)\n"
            "sys.meta_path.insert(0, Absent)\nfrom offload_export.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    result = subprocess.run([sys.executable, "-c", code, "export", str(checkpoint), str(tmp_path / "o"),
                             "--scheme", "int8", "--format", "compressed-tensors"], capture_output=True, text=True,
                            timeout=120)
    _check_error("no compressed-tensors", "needs compressed-tensors>=0.19,<0.21, which is not installed: "
                 'pip install "offload_export[compressed-tensors]"', result.returncode, result.stdout, result.stderr)


@pytest.mark.parametrize("fmt, scheme, config_file", [
    ("compressed-tensors", "int4-g128", "config.json"),
    ("modelopt", "int8", "hf_quant_config.json"),
])
def test_packed_formats_export_and_verify_from_the_command_line(capsys, tmp_path, checkpoint, fmt, scheme,
                                                                config_file):
    out = tmp_path / fmt
    result = _main(capsys, "export", checkpoint, out, "--scheme", scheme, "--format", fmt, "--max-memory", "cpu=1MB",
                   "--quiet")
    assert result == (0, "", ""), result  # ModelOpt's own prints included
    assert (out / config_file).is_file()
    assert "quantization_config" in json.loads((out / "config.json").read_text())
    code, stdout, stderr = _main(capsys, "verify", checkpoint, out)  # scheme and format read from OUT
    assert code == 0 and ": OK" in stdout, stderr
    assert f"quantized 21 linear weights ({scheme}" in stdout


@pytest.mark.slow
def test_verify_recognises_every_built_in_scheme_in_every_format_it_can_write(tmp_path, checkpoint):
    from transformers import AutoModelForCausalLM

    from offload_export.cli import _recorded

    for scheme in oe.SCHEMES:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
        oe.quantize_weights(model, scheme=scheme)
        for fmt in ("fake-quant", "compressed-tensors"):
            oe.save_clean(model, tmp_path / f"{scheme}-{fmt}", format=fmt)
            assert _recorded(tmp_path / f"{scheme}-{fmt}") == (scheme, fmt)
    assert _recorded(checkpoint) == ("none", "fake-quant")


def test_save_clean_checks_the_toolkit_release_before_writing(monkeypatch, tmp_path, checkpoint):
    """The library's own check (the command line's runs before loading; this one in the format, before writing)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    oe.quantize_weights(model, scheme="int8")
    # importlib.metadata finds the first distribution of a name on sys.path: this one
    monkeypatch.syspath_prepend(_fake_distribution(tmp_path / "site", "unused", "compressed-tensors", "0.18.0"))
    with pytest.raises(ImportError, match=r"format='compressed-tensors' needs compressed-tensors>=0.19,<0.21, but "
                                          r"compressed-tensors 0.18.0 is installed"):
        oe.save_clean(model, tmp_path / "o", format="compressed-tensors")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))


def test_an_already_quantized_checkpoint_is_refused_before_loading(capsys, tmp_path, checkpoint):
    src = tmp_path / "packed"
    src.mkdir()
    for f in checkpoint.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "fp8"}}))
    _check_error("quantized", "is already quantized (quantization_config in config.json, quant_method 'fp8')",
                 *_main(capsys, "export", src, tmp_path / "o", "--scheme", "int8"))


def test_library_hints_are_translated_to_the_command_line():
    from offload_export.cli import _one_line

    error = ValueError("x is compressed. Decompress it or export with fold=False")
    error.add_note("out is not empty; pass overwrite=True to replace it")
    assert _one_line(error) == ("x is compressed. Decompress it or export with save_clean(fold=False) from Python "
                                "out is not empty; pass --overwrite to replace it")
