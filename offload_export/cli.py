"""The ``offload-export`` command: argument parsing and calls into the package, nothing else."""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["build_parser", "main"]

PROG = "offload-export"
EPILOG = """\
examples:
  offload-export demo                                   # tiny model, mixed resident/cpu/disk offload, int8
  offload-export demo --size small --layout disk --scheme nvfp4
  offload-export layout ./my-model --max-memory cpu=2GiB
  offload-export export ./my-model ./my-model-int8 --scheme int8 --max-memory cpu=8GiB --offload-folder /scratch/off
  offload-export export ./my-model ./my-model-copy --scheme none --max-shard-size 2GB
  offload-export verify ./my-model ./my-model-int8 --scheme int8 --max-memory cpu=8GiB

Run 'offload-export COMMAND --help' for the options of one command.
"""


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line: ``offload-export: error: ...``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def _memory_cap(text: str) -> tuple[int | str, int]:
    """``"cpu=4GiB"`` -> ``("cpu", 4294967296)``; ``"0=20GB"`` -> ``(0, 20000000000)``."""
    from .plan import parse_size

    device, sep, size = text.partition("=")
    device = device.strip()
    if not sep or not device:
        raise argparse.ArgumentTypeError(f"{text!r}: expected DEVICE=SIZE, e.g. cpu=4GiB or 0=20GiB")
    if not device.isdigit() and device not in ("cpu", "mps", "xpu"):
        raise argparse.ArgumentTypeError(f"{text!r}: device {device!r} must be 'cpu', 'mps' or a GPU index like 0")
    try:
        return (int(device) if device.isdigit() else device), parse_size(size)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: size {size!r} is not a size like 4GiB, 500MB or 1073741824") from None


def _shard_size(text: str) -> int:
    from .plan import parse_size

    try:
        return parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 5GB or 500MiB") from None


def _add_loading(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="a Hugging Face checkpoint directory (config.json + *.safetensors)")
    p.add_argument("--max-memory", metavar="DEVICE=SIZE", nargs="+", action="extend", type=_memory_cap, default=[],
                   help="memory caps for device_map='auto', e.g. cpu=4GiB 0=20GiB; what does not fit is offloaded")
    p.add_argument("--offload-folder", metavar="DIR",
                   help="where disk-offloaded weights may be written (default: a temporary directory)")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                   help="dtype to load (and so export) the weights in (default: the checkpoint's)")


def build_parser() -> argparse.ArgumentParser:
    """The ``offload-export`` argument parser with its subcommands."""
    from . import demo
    from .adapters.builtin import SCHEMES
    from .formats import FORMATS

    parser = _Parser(prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                     description="Export fake-quantized, accelerate-offloaded Hugging Face models into clean, "
                                 "sharded safetensors checkpoints, one module at a time.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    p = sub.add_parser("demo", help="build, offload, fake-quantize, export and verify a Qwen3-shaped model",
                       description="Build a Qwen3-shaped model, reload it offloaded with accelerate, fake-quantize "
                                   "it, export it with save_clean, reload the export in plain transformers and "
                                   "compare logits. Exits 0 only if they match exactly.")
    p.add_argument("--out", metavar="DIR", help="keep the export here (default: a temporary directory)")
    p.add_argument("--layout", choices=demo.LAYOUTS, default="mixed",
                   help="where decoder layers live: cpu RAM, disk, or mixed (resident + cpu + disk; default)")
    p.add_argument("--scheme", choices=SCHEMES, default="int8", help="built-in fake quantization (default: int8)")
    p.add_argument("--size", choices=tuple(demo.SIZES), default="tiny",
                   help="tiny (a few MB, default) or small (about 260 MB)")
    p.add_argument("--quiet", action="store_true", help="print nothing; the exit code tells the result")

    p = sub.add_parser("export", help="load a checkpoint offloaded, fake-quantize it, export it",
                       description="Load SRC with device_map='auto' under the memory caps (never trust_remote_code), "
                                   "fake-quantize its linear weights with a built-in scheme and export it into OUT "
                                   "with save_clean (atomic: OUT appears only when complete).")
    _add_loading(p)
    p.add_argument("out", metavar="OUT", help="the destination directory (must be absent or empty)")
    p.add_argument("--scheme", choices=(*SCHEMES, "none"), default="none",
                   help="built-in fake quantization folded into the weights (default: none)")
    p.add_argument("--format", choices=tuple(FORMATS), default="fake-quant",
                   help="fake-quant: weights with the quantization folded in (default); a packed format writes what "
                        "that toolkit's own exporter writes")
    p.add_argument("--max-shard-size", type=_shard_size, default="5GB", help="bytes per shard (default: 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT once the export is complete")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed export into OUT: keep the shards it completed, if the plan is the same")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no report")

    p = sub.add_parser("verify", help="check an export against its source model, tensor by tensor",
                       description="Load MODEL_SRC as 'export' does, fake-quantize it with the same scheme and "
                                   "compare every tensor of OUT with it byte for byte, plus index, headers, "
                                   "quantizer state and config.json. Exits 0 only if nothing differs.")
    _add_loading(p)
    p.add_argument("out", metavar="OUT", help="the checkpoint written by 'export'")
    p.add_argument("--scheme", choices=(*SCHEMES, "none"), default="none",
                   help="the scheme OUT was exported with (default: none)")
    p.add_argument("--format", choices=tuple(FORMATS), default="fake-quant",
                   help="the format OUT was exported in (default: fake-quant)")
    p.add_argument("--quiet", action="store_true", help="no report; the exit code tells the result")

    p = sub.add_parser("layout", help="print where every weight would live when loaded with device_map='auto'",
                       description="Load SRC with device_map='auto' under the memory caps and print where every "
                                   "state-dict entry lives: resident, cpu, disk, safetensors (read from the "
                                   "checkpoint itself) or tied.")
    _add_loading(p)
    return parser


def _checkpoint_dir(src: str) -> Path:
    path = Path(src)
    if not path.is_dir():
        raise FileNotFoundError(f"{src}: no such directory")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{src}: not a Hugging Face checkpoint (no config.json)")
    return path


@contextlib.contextmanager
def _offload_folder(folder: str | None) -> Iterator[str]:
    if folder is not None:
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="offload-export-") as tmp:
        yield tmp


def _load(args: argparse.Namespace, offload_folder: str):
    from transformers import AutoModelForCausalLM

    from .quiet import quiet_libraries

    src = _checkpoint_dir(args.src)
    with quiet_libraries():  # "some parameters are on the meta device" is the point here, not news
        model = AutoModelForCausalLM.from_pretrained(src, device_map="auto", max_memory=dict(args.max_memory) or None,
                                                     offload_folder=offload_folder, dtype=args.dtype,
                                                     trust_remote_code=False)
    return model.eval()


def _tokenizer(src: str):
    """The checkpoint's tokenizer when it ships one, so that the export is complete."""
    if not (Path(src) / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(src, trust_remote_code=False)


def _summary(lay) -> str:
    return ", ".join(f"{kind} {n} tensors {b / 1e6:.1f} MB" for kind, (n, b) in lay.summary().items())


def _load_quantized(args: argparse.Namespace, offload_folder: str, say):
    from . import layout
    from .adapters.builtin import quantize_weights

    model = _load(args, offload_folder)
    say(f"loaded {args.src}: {_summary(layout(model))}")
    if args.scheme != "none":
        say(f"fake-quantized {quantize_weights(model, scheme=args.scheme)} linear weights ({args.scheme})")
    return model


def _run_export(args: argparse.Namespace) -> int:
    from . import save_clean
    from ._atomic import check_destination

    _checkpoint_dir(args.src)
    protected = [args.src, *([args.offload_folder] if args.offload_folder else [])]
    check_destination(Path(args.out), overwrite=args.overwrite, protected=protected)  # before the (long) load
    say = (lambda *a: None) if args.quiet else print
    with _offload_folder(args.offload_folder) as folder:
        model = _load_quantized(args, folder, say)
        report = save_clean(model, args.out, format=args.format, max_shard_size=args.max_shard_size,
                            overwrite=args.overwrite, tokenizer=_tokenizer(args.src),
                            progress=not args.quiet and sys.stdout.isatty(), resume=args.resume)
    say(report)
    return 0


def _run_verify(args: argparse.Namespace) -> int:
    from . import verify

    if not Path(args.out).is_dir():
        raise FileNotFoundError(f"{args.out}: no such directory")
    say = (lambda *a: None) if args.quiet else print
    with _offload_folder(args.offload_folder) as folder:
        report = verify(_load_quantized(args, folder, say), args.out, format=args.format)
    say(report)
    if not report.ok:
        raise RuntimeError(f"{args.out} differs from {args.src}: {len(report.mismatches)} mismatch(es), "
                           f"first: {report.mismatches[0]}")
    return 0


def _run_layout(args: argparse.Namespace) -> int:
    from . import layout

    with _offload_folder(args.offload_folder) as folder:
        print(layout(_load(args, folder)))
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(args.out, layout=args.layout, scheme=args.scheme, size=args.size,
                      log=(lambda line: None) if args.quiet else print,
                      progress=not args.quiet and sys.stdout.isatty())
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (0 success, 1 failure, 2 bad usage, 130 interrupted).

    Args:
        argv: the arguments without the program name (default: ``sys.argv[1:]``).
    """
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except (OSError, ValueError, RuntimeError) as e:
        text = "\n".join([str(e), *getattr(e, "__notes__", ())])  # a toolkit's own error carries our context as notes
        message = " ".join(line.strip() for line in text.splitlines() if line.strip())
        print(f"{PROG}: error: {message or type(e).__name__}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
