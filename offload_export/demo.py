"""The ``offload-export demo``: build a Qwen3-shaped checkpoint, reload it offloaded, quantize, export, verify.

Everything goes through the real libraries: the checkpoint is written with safetensors, reloaded with
transformers + accelerate (``from_pretrained(device_map=..., offload_folder=...)`` or ``dispatch_model``),
fake-quantized with :mod:`offload_export.adapters.builtin`, exported with :func:`offload_export.save_clean` and
reloaded with plain ``AutoModelForCausalLM.from_pretrained`` to compare logits.
"""

from __future__ import annotations

import math
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .quiet import quiet_libraries

__all__ = ["LAYOUTS", "SIZES", "DemoResult", "PeakMemory", "build_checkpoint", "execution_device",
           "load_offloaded", "run_demo"]

LAYOUTS = ("cpu", "disk", "mixed")
_QWEN3 = dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=512)
SIZES = {
    # ~2.2 MB in bfloat16 (1.1 M parameters)
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3, vocab_size=4096, head_dim=32, **_QWEN3),
    # ~260 MB in bfloat16 (130 M parameters)
    "small": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=8, vocab_size=32000, head_dim=128,
                  **{**_QWEN3, "num_attention_heads": 8, "num_key_value_heads": 4}),
}
DTYPE = torch.bfloat16
PROMPT = (1, 17, 42, 7, 99, 3, 250, 64, 11, 500)  # fixed token ids (taken modulo the vocabulary)


@dataclass
class DemoResult:
    """What one demo run measured.

    Attributes:
        out_dir: the exported checkpoint.
        layout: ``kind -> (tensor count, bytes)`` of the offloaded model (:meth:`Layout.summary`).
        quantized: number of ``nn.Linear`` weights that got a fake quantizer.
        report: the :class:`~offload_export.ExportReport` of :func:`~offload_export.save_clean`.
        peak_anon, peak_rss: peak growth of ``RssAnon`` / ``VmRSS`` during the export, in bytes.
        max_diff: max |logit difference| between the fake-quantized model and the reloaded export.
        mismatches: what :func:`~offload_export.verify` found different between the files and the model.
        quant_effect: max |logit difference| between the fake-quantized and the unquantized model.
        device: where both forwards ran.
    """

    out_dir: str
    layout: dict[str, tuple[int, int]]
    quantized: int
    report: object
    peak_anon: int
    peak_rss: int
    max_diff: float
    mismatches: list[str]
    quant_effect: float
    device: str

    @property
    def verified(self) -> bool:
        """The files match the model tensor by tensor and the reloaded export's logits match exactly."""
        return self.max_diff == 0.0 and not self.mismatches


class PeakMemory:
    """Peak growth of ``RssAnon`` (memory the process holds) and ``VmRSS`` (also mapped file pages).

    A thread samples ``/proc/self/status`` every ``period`` seconds while the block runs. Both are 0 where
    ``/proc`` does not exist.
    """

    def __init__(self, period: float = 0.002):
        self.period = period
        self.peak_anon = self.peak_rss = 0
        self._stop = threading.Event()

    @staticmethod
    def _read() -> tuple[int, int]:
        values = {}
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(("RssAnon:", "VmRSS:")):
                        name, kb = line.split()[:2]
                        values[name] = int(kb) * 1024
        except OSError:
            return 0, 0
        return values.get("RssAnon:", 0), values.get("VmRSS:", 0)

    def _sample(self, base: tuple[int, int]) -> None:
        while True:
            anon, rss = self._read()
            self.peak_anon = max(self.peak_anon, anon - base[0])
            self.peak_rss = max(self.peak_rss, rss - base[1])
            if self._stop.wait(self.period):
                return

    def __enter__(self) -> PeakMemory:
        self._thread = threading.Thread(target=self._sample, args=(self._read(),), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _init_value(name: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """Random weights that keep activations O(1): norms near 1, matrices with std 1/sqrt(fan_in)."""
    noise = torch.randn(shape, generator=gen, dtype=DTYPE)
    if "norm" in name:
        return noise.mul_(0.1).add_(1.0)
    return noise.mul_(1.0 / math.sqrt(shape[-1])) if len(shape) > 1 else noise.mul_(0.02)


def build_checkpoint(path: str | Path, size: str = "tiny", *, seed: int = 0):
    """Write a Qwen3-shaped ``bfloat16`` checkpoint with random weights into ``path``.

    The model is built on the meta device (no slow CPU init); each tensor is drawn with ``torch.randn``
    and written with ``safetensors``; tied weights are written once, as ``save_pretrained`` does.

    Args:
        path: the directory to create.
        size: ``"tiny"`` (about 2.2 MB) or ``"small"`` (about 260 MB).
        seed: the random seed; the same seed writes the same bytes.

    Returns:
        The model's ``Qwen3Config``.

    Raises:
        ValueError: ``size`` is not one of :data:`SIZES`.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen3Config

    if size not in SIZES:
        raise ValueError(f"size={size!r}: expected one of {', '.join(SIZES)}")
    config = Qwen3Config(**SIZES[size], dtype="bfloat16")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPE)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    gen = torch.Generator().manual_seed(seed)
    tensors = {k: _init_value(k, v.shape, gen) for k, v in model.state_dict().items() if k not in tied}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config.architectures = [type(model).__name__]
    config.save_pretrained(path)
    GenerationConfig.from_model_config(config).save_pretrained(path)
    return config


def _placement(config, layout: str) -> dict[str, str]:
    """``module -> "resident" | "cpu" | "disk"``: embeddings, final norm and the tied head stay resident."""
    n = config.num_hidden_layers
    cycle = {"cpu": ("cpu",), "disk": ("disk",), "mixed": ("resident", "cpu", "disk")}[layout]
    placement = {"model.embed_tokens": "resident", "model.rotary_emb": "resident"}
    placement.update({f"model.layers.{i}": cycle[i % len(cycle)] for i in range(n)})
    placement.update({"model.norm": "resident", "lm_head": "resident"})
    return placement


def execution_device() -> torch.device:
    """``cuda:0`` when there is a GPU, else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def load_offloaded(src: str | Path, layout: str, offload_dir: str | Path):
    """Reload the checkpoint at ``src`` with real accelerate offloading.

    ``"disk"``: ``from_pretrained(device_map=..., offload_folder=...)``, decoder layers on disk (read from
    the checkpoint's own safetensors file). ``"cpu"`` / ``"mixed"``: a resident load, then
    ``accelerate.dispatch_model`` with decoder layers offloaded to CPU RAM (and, for mixed, to ``.dat``
    files in ``offload_dir``).

    Args:
        src: a checkpoint written by :func:`build_checkpoint` (any Qwen3-like causal LM works).
        layout: ``"cpu"``, ``"disk"`` or ``"mixed"``.
        offload_dir: where disk-offloaded weights may be written.

    Returns:
        The offloaded model in eval mode.

    Raises:
        ValueError: ``layout`` is not one of :data:`LAYOUTS`.
    """
    import accelerate
    from transformers import AutoConfig, AutoModelForCausalLM

    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {', '.join(LAYOUTS)}")
    placement = _placement(AutoConfig.from_pretrained(src), layout)
    main = execution_device()
    if layout == "disk":
        # On a CPU-only host the residents must be the string "cpu": with disk entries transformers builds a
        # safetensors loader on the main device, and safe_open rejects torch.device("cpu").
        resident = "cpu" if main.type == "cpu" else main.index
        device_map = {m: resident if p == "resident" else p for m, p in placement.items()}
        model = AutoModelForCausalLM.from_pretrained(src, device_map=device_map, offload_folder=str(offload_dir),
                                                     dtype=DTYPE)
        return model.eval()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=DTYPE)
    # dispatch_model keeps "cpu" entries resident when main_device == "cpu" (a string comparison); a
    # torch.device main device (and torch.device residents) makes them really offloaded to RAM.
    device_map = {m: main if p == "resident" else p for m, p in placement.items()}
    model = accelerate.dispatch_model(model, device_map, main_device=main, offload_dir=str(offload_dir))
    return model.eval()


def _logits(model, device: torch.device) -> torch.Tensor:
    ids = torch.tensor([PROMPT], device=device) % model.config.vocab_size
    with torch.no_grad():
        return model(input_ids=ids).logits.float().cpu()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def run_demo(out: str | Path | None = None, *, layout: str = "mixed", scheme: str = "int8", size: str = "tiny",
             log: Callable[[str], None] = print, progress: bool = False, overwrite: bool = False) -> DemoResult:
    """Build, offload, fake-quantize, export and verify a Qwen3-shaped model; log a report.

    Args:
        out: the export directory (absent or empty, unless ``overwrite``); a temporary one, deleted at the end, if None.
        layout: ``"cpu"``, ``"disk"`` or ``"mixed"`` (resident + cpu + disk).
        scheme: a built-in fake-quantization scheme (:data:`offload_export.builtin.SCHEMES`).
        size: ``"tiny"`` or ``"small"``.
        log: where report lines go.
        progress: show the export's progress bar.
        overwrite: replace a non-empty ``out`` once the export is complete.

    Returns:
        A :class:`DemoResult`; ``result.verified`` tells whether the reloaded checkpoint reproduces the
        fake-quantized model's logits exactly.

    Raises:
        ValueError: an unknown layout, scheme or size.
        FileExistsError: ``out`` is not empty and ``overwrite`` is False.
    """
    from .adapters import builtin

    if scheme not in builtin.SCHEMES:
        raise ValueError(f"scheme={scheme!r}: expected one of {', '.join(builtin.SCHEMES)}")
    if size not in SIZES:
        raise ValueError(f"size={size!r}: expected one of {', '.join(SIZES)}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {', '.join(LAYOUTS)}")
    with tempfile.TemporaryDirectory(prefix="offload-export-demo-") as work, quiet_libraries():
        return _run(Path(work), Path(out) if out is not None else Path(work) / "export", layout, scheme, size,
                    log, progress, keep=out is not None, overwrite=overwrite)


def _run(work: Path, out: Path, layout: str, scheme: str, size: str, log, progress: bool, keep: bool,
         overwrite: bool) -> DemoResult:
    from transformers import AutoModelForCausalLM

    from .adapters import builtin
    from .export import save_clean
    from ._atomic import check_destination
    from .layout import layout as layout_of
    from .verify import verify

    check_destination(out, overwrite=overwrite)
    start = time.perf_counter()
    config = build_checkpoint(work / "source", size)
    model = load_offloaded(work / "source", layout, work / "offload")
    summary = layout_of(model).summary()
    total = sum(b for kind, (_, b) in summary.items() if kind != "tied")
    log(f"model: Qwen3-shaped, {size}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"{total / 1e6:.1f} MB bfloat16, tied embeddings")
    log("layout (" + layout + "): " + ", ".join(f"{k} {n} tensors {b / 1e6:.1f} MB" for k, (n, b) in summary.items()))
    device = execution_device()
    plain = _logits(model, device)
    quantized = builtin.quantize_weights(model, scheme=scheme)
    expected = _logits(model, device)
    log(f"fake-quantized: {quantized} linear weights ({scheme})")
    with PeakMemory() as mem:
        report = save_clean(model, out, progress=progress, overwrite=overwrite)
    log(f"export: {report.tensors} tensors, {report.bytes / 1e6:.1f} MB in {report.shards} shard(s), "
        f"{report.seconds:.2f} s -> {out if keep else '(temporary directory)'}")
    log(f"  files: {', '.join(report.files)}")
    log(f"  peak memory growth during export: RssAnon +{mem.peak_anon / 1e6:.1f} MB, "
        f"VmRSS +{mem.peak_rss / 1e6:.1f} MB")
    check = verify(model, out)
    log(f"verify (files vs model, byte for byte): {check.tensors} tensors, "
        f"{'OK' if check.ok else f'{len(check.mismatches)} mismatch(es)'}")
    for mismatch in check.mismatches[:10]:
        log(f"  - {mismatch}")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=DTYPE).to(device).eval()
    got = _logits(reloaded, device)
    diff, effect = _max_diff(expected, got), _max_diff(expected, plain)
    log(f"reload (transformers AutoModelForCausalLM.from_pretrained): max |logit diff| vs the fake-quantized "
        f"model = {diff:g} (bfloat16 on {device}; quantization itself moved logits by up to {effect:.3g})")
    log(f"total: {time.perf_counter() - start:.1f} s")
    return DemoResult(str(out), summary, quantized, report, mem.peak_anon, mem.peak_rss, diff, check.mismatches,
                      effect, str(device))
