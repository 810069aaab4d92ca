"""The ``offload-export`` command: argument parsing and calls into the package, nothing else.

Importing this module imports neither torch nor transformers, so ``--help`` and ``--version`` answer at
once; a command imports what it needs after its arguments are parsed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from . import __version__

__all__ = ["FORMATS", "SCHEMES", "build_parser", "main"]

PROG = "offload-export"
#: the built-in schemes and the output formats (tests/test_cli.py checks them against the package's registries,
#: which cannot be imported here without torch)
SCHEMES = ("int8", "fp8", "int4-g128", "nvfp4")
FORMATS = ("fake-quant", "modelopt", "compressed-tensors")
_LAYOUTS = ("cpu", "disk", "mixed")
_SIZES = ("tiny", "small")
_MAX_BYTES = 2**63 - 1
#: ModelOpt's configuration for each built-in scheme, weights only (no calibration data needed)
_MODELOPT_CONFIGS = {"int8": "INT8_WEIGHT_ONLY_CFG", "int4-g128": "INT4_BLOCKWISE_WEIGHT_ONLY_CFG"}
_MODELOPT_ALGOS = {"W8A16": "int8", "W4A16_AWQ": "int4-g128"}  # hf_quant_config.json's quant_algo of each
EPILOG = """\
examples:
  offload-export demo                                   # tiny model, mixed resident/cpu/disk offload, int8
  offload-export demo --size small --layout disk --scheme nvfp4
  offload-export layout ./my-model --max-memory cpu=2GiB
  offload-export export ./my-model ./my-model-int8 --scheme int8 --max-memory cpu=8GiB --offload-folder /scratch/off
  offload-export export ./my-model ./my-model-w4 --scheme int4-g128 --format compressed-tensors
  offload-export export ./my-model ./my-model-copy --max-shard-size 2GB
  offload-export verify ./my-model ./my-model-int8 --max-memory cpu=8GiB

Run 'offload-export COMMAND --help' for the options of one command.
"""
# Library messages name Python arguments; on the command line they are flags (or not available at all).
_CLI_HINTS = (
    (re.compile(r"\boverwrite=True\b"), "--overwrite"),
    (re.compile(r"\bpass dtype= to save_clean\b"), "pass --dtype"),
    (re.compile(r"\bpass device='cuda'"), "call save_clean(device='cuda') from Python"),
    (re.compile(r"\bexport with fold=False\b"), "export with save_clean(fold=False) from Python"),
)


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line: ``offload-export: error: ...``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def _bytes(text: str) -> int:
    """``"4GiB"`` -> 4294967296 (``plan.parse_size``); ValueError for what is not a size, or not one below 2**63."""
    from .plan import parse_size

    try:
        value = parse_size(text)
    except OverflowError:  # a number too large for a float
        raise ValueError(text) from None
    if value > _MAX_BYTES:
        raise ValueError(text)
    return value


def _memory_caps(text: str) -> list[tuple[int | str, int]]:
    """``"0=20GiB,cpu=4GiB"`` -> ``[(0, 21474836480), ("cpu", 4294967296)]``."""
    caps = []
    for item in text.split(","):
        device, sep, size = item.partition("=")
        device = device.strip()
        if not sep or not device:
            raise argparse.ArgumentTypeError(f"{item!r}: expected DEVICE=SIZE, e.g. cpu=4GiB or 0=20GiB")
        if not device.isdigit() and device not in ("cpu", "mps", "xpu"):
            raise argparse.ArgumentTypeError(f"{item!r}: device {device!r} must be 'cpu', 'mps' or a GPU index like 0")
        try:
            caps.append((int(device) if device.isdigit() else device, _bytes(size)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: size {size!r} is not a size like 4GiB, 500MB or "
                                             f"1073741824 (at most 2**63 - 1 bytes)") from None
    return caps


def _shard_size(text: str) -> int:
    try:
        return _bytes(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 5GB or 500MiB (at most 2**63 - 1 bytes)") \
            from None


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", action="store_true",
                   help="show each phase and its progress bars also when stderr is not a terminal")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors; the exit code tells the result")


def _add_loading(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="a Hugging Face checkpoint directory (config.json + *.safetensors)")
    p.add_argument("--max-memory", metavar="DEVICE=SIZE[,...]", action="append", type=_memory_caps, default=[],
                   help="memory caps for device_map='auto', e.g. 0=20GiB,cpu=4GiB (or the option once per device); "
                        "what does not fit is offloaded")
    p.add_argument("--offload-folder", metavar="DIR",
                   help="where disk-offloaded weights may be written (default: a temporary directory)")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                   help="dtype to load (and so export) the weights in (default: the checkpoint's)")


def build_parser() -> argparse.ArgumentParser:
    """The ``offload-export`` argument parser with its subcommands."""
    parser = _Parser(prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                     description="Export fake-quantized, accelerate-offloaded Hugging Face models into clean, "
                                 "sharded safetensors checkpoints, one module at a time.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    p = sub.add_parser("demo", help="build, offload, fake-quantize, export and verify a Qwen3-shaped model",
                       description="Build a Qwen3-shaped model, reload it offloaded with accelerate, fake-quantize "
                                   "it, export it with save_clean, reload the export in plain transformers and "
                                   "compare logits. Exits 0 only if they match exactly.")
    p.add_argument("--out", metavar="DIR", help="keep the export here (default: a temporary directory)")
    p.add_argument("--layout", choices=_LAYOUTS, default="mixed",
                   help="where decoder layers live: cpu RAM, disk, or mixed (resident + cpu + disk; default)")
    p.add_argument("--scheme", choices=SCHEMES, default="int8", help="built-in fake quantization (default: int8)")
    p.add_argument("--size", choices=_SIZES, default="tiny", help="tiny (a few MB, default) or small (about 260 MB)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out once the export is complete")
    _add_common(p)

    p = sub.add_parser("export", help="load a checkpoint offloaded, quantize it, export it",
                       description="Load SRC with device_map='auto' under the memory caps (never trust_remote_code), "
                                   "fake-quantize its linear weights (but lm_head) with a built-in scheme and export "
                                   "it into OUT with save_clean (atomic: OUT appears only when complete). With "
                                   "--format modelopt the weights are quantized by ModelOpt itself "
                                   f"({', '.join(f'{s}: {c}' for s, c in _MODELOPT_CONFIGS.items())}), which keeps "
                                   "disk-offloaded weights in CPU RAM once quantized.")
    _add_loading(p)
    p.add_argument("out", metavar="OUT", help="the destination directory (must be absent or empty)")
    p.add_argument("--scheme", choices=(*SCHEMES, "none"), default="none",
                   help="fake quantization folded into (or packed from) the weights (default: none)")
    p.add_argument("--format", choices=FORMATS, default="fake-quant",
                   help="fake-quant: weights with the quantization folded in (default); compressed-tensors / "
                        "modelopt: the packed checkpoint that toolkit's own exporter writes (needs "
                        "pip install \"offload_export[compressed-tensors]\" / \"offload_export[modelopt]\")")
    p.add_argument("--max-shard-size", type=_shard_size, default="5GB", help="bytes per shard (default: 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT once the export is complete")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed export into OUT: keep the shards it completed, if the plan is the same")
    _add_common(p)

    p = sub.add_parser("verify", help="check an export against its source model, tensor by tensor",
                       description="Load SRC as 'export' does, quantize it with the scheme OUT records and compare "
                                   "every tensor of OUT with it byte for byte, plus index, headers, quantizer state "
                                   "and config.json. Exits 0 only if nothing differs.")
    _add_loading(p)
    p.add_argument("out", metavar="OUT", help="the checkpoint written by 'export'")
    p.add_argument("--scheme", choices=(*SCHEMES, "none"),
                   help="the scheme OUT was exported with (default: the one OUT records)")
    p.add_argument("--format", choices=FORMATS, help="the format OUT was exported in (default: the one OUT records)")
    _add_common(p)

    p = sub.add_parser("layout", help="print where every weight would live when loaded with device_map='auto'",
                       description="Load SRC with device_map='auto' under the memory caps and print where every "
                                   "state-dict entry lives: resident, cpu, disk, safetensors (read from the "
                                   "checkpoint itself) or tied.")
    _add_loading(p)
    _add_common(p)
    return parser


class _Phases:
    """Each phase's start and duration on stderr, and whether progress bars are shown."""

    def __init__(self, args: argparse.Namespace):
        self.show = not args.quiet and (args.progress or sys.stderr.isatty())

    @contextlib.contextmanager
    def __call__(self, what: str) -> Iterator[None]:
        if self.show:
            print(f"{PROG}: {what} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        yield
        if self.show:
            print(f"{PROG}: {what}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def _checkpoint_dir(src: str) -> Path:
    path = Path(src)
    if not path.is_dir():
        raise FileNotFoundError(f"{src}: no such directory")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{src}: not a Hugging Face checkpoint (no config.json)")
    return path


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot be read as JSON ({e})") from None


def _check_source(src: Path) -> None:
    """Refuse, before loading, what the command line cannot export: not a causal LM, already quantized, remote code."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = _read_json(src / "config.json")
    causal = {c for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for c in ((v,) if isinstance(v, str) else v)}
    architectures = config.get("architectures") or []
    if architectures and not set(architectures) & causal:
        raise ValueError(f"{src}: its architecture {', '.join(architectures)} is not a causal language model; the "
                         f"command line loads causal LMs only (AutoModelForCausalLM): load this model with its own "
                         f"class in Python and call offload_export.save_clean(model, OUT)")
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method is not None:
        raise ValueError(f"{src} is already quantized (quantization_config in config.json, quant_method {method!r}); "
                         f"the command line quantizes unquantized checkpoints: start from the unquantized one, or "
                         f"load this one in Python and call offload_export.save_clean(model, OUT)")
    if "auto_map" in config and config.get("model_type") not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"{src}: its model needs its own code (auto_map in config.json), which the command line "
                         f"never runs; if you trust it, load it in Python with transformers' trust_remote_code "
                         f"option and call offload_export.save_clean(model, OUT)")


def _check_loading(src: Path, info: dict) -> None:
    """Missing or unexpected weights would be exported as random or dropped ones: refuse them."""
    problems = []
    for what in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(what) or ())
        if keys:
            shown = ", ".join(keys[:5]) + (f", ... ({len(keys) - 5} more)" if len(keys) > 5 else "")
            problems.append(f"{len(keys)} {what.replace('_keys', '')} weight(s): {shown}")
    if problems:
        raise ValueError(f"{src} does not match its model class: {'; '.join(problems)}; exporting it would write "
                         f"randomly initialised weights or drop some: repair or download the checkpoint again")


@contextlib.contextmanager
def _offload_folder(folder: str | None) -> Iterator[str]:
    if folder is not None:
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="offload-export-") as tmp:
        yield tmp


def _load(args: argparse.Namespace, offload_folder: str, phases: _Phases):
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from .quiet import quiet_libraries

    src = _checkpoint_dir(args.src)
    _check_source(src)
    caps = dict(cap for group in args.max_memory for cap in group)
    with phases(f"loading {args.src}"), quiet_libraries():  # "some parameters are on the meta device" is the point
        if phases.show:
            hf_logging.enable_progress_bar()
        try:
            model, info = AutoModelForCausalLM.from_pretrained(
                src, device_map="auto", max_memory=caps or None, offload_folder=offload_folder, dtype=args.dtype,
                trust_remote_code=False, output_loading_info=True)
        except SafetensorError as e:
            raise ValueError(f"{src}: a weights file cannot be read ({e}); it is damaged or incomplete: "
                             f"download it again") from None
    _check_loading(src, info)
    return model.eval()


def _tokenizer(src: str):
    """The checkpoint's tokenizer when it ships one, so that the export is complete."""
    if not (Path(src) / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(src, trust_remote_code=False)


def _summary(lay) -> str:
    return ", ".join(f"{kind} {n} tensors {b / 2**20:.1f} MiB" for kind, (n, b) in lay.summary().items())


def _quantize(model, scheme: str, fmt: str, phases: _Phases) -> int:
    """Quantize ``model``'s Linear weights (but lm_head): built-in, or ModelOpt's own for ``--format modelopt``."""
    if fmt == "modelopt":
        import io
        import logging
        import warnings

        # ModelOpt prints what it inserts on stdout: stderr's business here, and nothing under --quiet
        chatter = sys.stderr if phases.show else io.StringIO()
        cpp_extension = logging.getLogger("torch.utils.cpp_extension")  # "No CUDA runtime is found" on a CPU host
        level = cpp_extension.level
        cpp_extension.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
                warnings.simplefilter("ignore")  # version notes on import; "disk writeback kept in CPU state_dict"
                import modelopt.torch.quantization as mtq

                with phases(f"quantizing with ModelOpt's {_MODELOPT_CONFIGS[scheme]}"):
                    mtq.quantize(model, getattr(mtq, _MODELOPT_CONFIGS[scheme]), forward_loop=None)
        finally:
            cpp_extension.setLevel(level)
        from .quantizers import find_quantizers

        return sum(q.enabled for q in find_quantizers(model, "weight"))
    from torch import nn

    from .adapters.builtin import quantize_weights

    with phases(f"fake-quantizing ({scheme})"):
        if not phases.show:
            return quantize_weights(model, scheme=scheme)
        from tqdm.auto import tqdm

        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rpartition(".")[2] != "lm_head"]
        for name in tqdm(names, desc=f"{PROG}: {scheme}", unit="linear"):
            quantize_weights(model, scheme=scheme, modules=[name])
        return len(names)


def _load_quantized(args: argparse.Namespace, offload_folder: str, say, phases: _Phases):
    from .layout import layout

    model = _load(args, offload_folder, phases)
    say(f"loaded {args.src}: {_summary(layout(model))}")
    if args.scheme != "none":
        n = _quantize(model, args.scheme, args.format, phases)
        say(f"quantized {n} linear weights ({args.scheme}{', ModelOpt' if args.format == 'modelopt' else ''})")
    return model


def _check_format(scheme: str, fmt: str) -> None:
    """What the command line can write in ``fmt``, checked before the (long) load."""
    from .toolkits import require_toolkit

    require_toolkit(fmt)
    if fmt == "fake-quant":
        return
    if scheme == "none":
        raise ValueError(f"--format {fmt} packs quantized weights: pass --scheme too")
    if fmt == "modelopt" and scheme not in _MODELOPT_CONFIGS:
        raise ValueError(f"--format modelopt: the command line quantizes with ModelOpt's weight-only configurations "
                         f"({', '.join(f'--scheme {s}' for s in _MODELOPT_CONFIGS)}); for --scheme {scheme}, quantize "
                         f"with modelopt.torch.quantization in Python (calibration data for its activation "
                         f"quantizers) and call offload_export.save_clean(model, OUT, format='modelopt'), or use "
                         f"--format compressed-tensors")


def _say(args: argparse.Namespace) -> Callable[..., None]:
    return (lambda *a: None) if args.quiet else print


def _run_export(args: argparse.Namespace) -> int:
    from ._atomic import check_destination
    from .export import save_clean

    _checkpoint_dir(args.src)
    _check_format(args.scheme, args.format)
    protected = [args.src, *([args.offload_folder] if args.offload_folder else [])]
    check_destination(Path(args.out), overwrite=args.overwrite, protected=protected)  # before the (long) load
    say, phases = _say(args), _Phases(args)
    with _offload_folder(args.offload_folder) as folder:
        model = _load_quantized(args, folder, say, phases)
        with phases(f"exporting to {args.out}"):
            report = save_clean(model, args.out, format=args.format, max_shard_size=args.max_shard_size,
                                overwrite=args.overwrite, tokenizer=_tokenizer(args.src), progress=phases.show,
                                resume=args.resume)
    say(report)
    return 0


def _compressed_tensors_scheme(qc: dict) -> str | None:
    """The built-in scheme a compressed-tensors ``quantization_config`` was written from, if any."""
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) != 1 or not isinstance(groups[0].get("weights"), dict):
        return None
    w, fmt = groups[0]["weights"], groups[0].get("format") or qc.get("format")
    key = (fmt, w.get("type"), w.get("num_bits"), w.get("strategy"), w.get("group_size"))
    return {("pack-quantized", "int", 8, "channel", None): "int8",
            ("pack-quantized", "int", 4, "group", 128): "int4-g128",
            ("float-quantized", "float", 8, "channel", None): "fp8",
            ("nvfp4-pack-quantized", "float", 4, "tensor_group", 16): "nvfp4"}.get(key)


def _fake_quant_scheme(state: Path) -> str | None:
    """The built-in scheme in ``quantizer_state.safetensors``' metadata ("none" without it), if it is one."""
    if not state.is_file():
        return "none"
    with open(state, "rb") as f:  # the metadata is in the JSON header: no need to read any tensor
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    quantizers = json.loads((header.get("__metadata__") or {}).get("quantizers", "{}"))
    schemes = {(q.get("class"), (q.get("config") or {}).get("scheme")) for q in quantizers.values()}
    return next(iter(schemes))[1] if len(schemes) == 1 and next(iter(schemes))[0] == "FakeQuantizer" else None


def _recorded(out: Path) -> tuple[str | None, str]:
    """``(scheme, format)`` the checkpoint ``out`` records; ``scheme`` is None when no built-in scheme wrote it."""
    config = _read_json(out / "config.json") if (out / "config.json").is_file() else {}
    qc = config.get("quantization_config") or {}
    if (out / "hf_quant_config.json").is_file():
        algo = (_read_json(out / "hf_quant_config.json").get("quantization") or {}).get("quant_algo")
        return _MODELOPT_ALGOS.get(algo), "modelopt"
    if qc.get("quant_method") == "compressed-tensors":
        return _compressed_tensors_scheme(qc), "compressed-tensors"
    try:
        return _fake_quant_scheme(out / "quantizer_state.safetensors"), "fake-quant"
    except (OSError, ValueError) as e:
        raise ValueError(f"{out / 'quantizer_state.safetensors'}: cannot be read ({e})") from None


def _verify_settings(args: argparse.Namespace) -> str:
    """Fill in ``--scheme`` / ``--format`` from what OUT records; return a hint when the user's differ."""
    scheme, fmt = _recorded(Path(args.out))
    if args.format is None:
        args.format = fmt
    if args.scheme is None:
        if scheme is None:
            raise ValueError(f"{args.out} was not written from a built-in scheme (format {fmt}), which the command "
                             f"line cannot reproduce: pass --scheme, or call offload_export.verify(model, OUT, "
                             f"format={fmt!r}) in Python on the model you exported")
        args.scheme = scheme
    asked = [f"--{k} {v}" for k, v, rec in (("scheme", args.scheme, scheme), ("format", args.format, fmt))
             if rec is not None and v != rec]
    if not asked:
        return ""
    records = f"--scheme {scheme} --format {fmt}" if scheme is not None else f"--format {fmt}"
    return f"{args.out} records {records}, you asked for {' '.join(asked)}: run verify without them to use its own"


def _run_verify(args: argparse.Namespace) -> int:
    from .verify import verify

    if not Path(args.out).is_dir():
        raise FileNotFoundError(f"{args.out}: no such directory")
    hint = _verify_settings(args)
    _check_format(args.scheme, args.format)
    say, phases = _say(args), _Phases(args)
    if hint and not args.quiet:
        print(f"{PROG}: note: {hint}", file=sys.stderr)
    with _offload_folder(args.offload_folder) as folder:
        model = _load_quantized(args, folder, say, phases)
        with phases(f"verifying {args.out} against {args.src}"):
            report = verify(model, args.out, format=args.format)
    say(report)
    if not report.ok:
        raise RuntimeError(f"{args.out} differs from {args.src}: {len(report.mismatches)} mismatch(es), "
                           f"first: {report.mismatches[0]}" + (f" ({hint})" if hint else ""))
    return 0


def _run_layout(args: argparse.Namespace) -> int:
    from .layout import layout

    with _offload_folder(args.offload_folder) as folder:
        lay = layout(_load(args, folder, _Phases(args)))
    if not args.quiet:
        print(lay)
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(args.out, layout=args.layout, scheme=args.scheme, size=args.size, overwrite=args.overwrite,
                      log=(lambda line: None) if args.quiet else print, progress=_Phases(args).show)
    if result.mismatches:
        raise RuntimeError(f"verification failed: {len(result.mismatches)} tensor(s) of the export differ from "
                           f"the model, first: {result.mismatches[0]}")
    if not result.verified:
        raise RuntimeError(f"verification failed: the reloaded export's logits differ from the fake-quantized "
                           f"model's by up to {result.max_diff:g}")
    if not args.quiet:
        print("verified: the exported checkpoint reproduces the fake-quantized model exactly")
    return 0


_COMMANDS = {"demo": _run_demo, "export": _run_export, "layout": _run_layout, "verify": _run_verify}


def _one_line(e: BaseException) -> str:
    text = "\n".join([str(e), *getattr(e, "__notes__", ())])  # a toolkit's own error carries our context as notes
    message = " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(e).__name__
    for pattern, replacement in _CLI_HINTS:
        message = pattern.sub(replacement, message)
    return message


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (0 success, 1 failure, 2 bad usage, 130 interrupted).

    Args:
        argv: the arguments without the program name (default: ``sys.argv[1:]``).
    """
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except (OSError, ValueError, RuntimeError, ImportError) as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
