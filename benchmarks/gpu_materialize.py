"""GPU check of ``materialized()``: accelerate layouts whose execution device is CUDA (and compressed-tensors'
CPUCache onloading to CUDA). Each check prints PASS/FAIL; the exit status is the number of failures.

Checked per layout (cpu_offload, disk_offload, dispatch_model cpu+disk, from_pretrained disk):
values on the GPU and equal to the reference; forward inside a block does not re-offload; nested writeback
persisted; overlapping blocks restored by the last one; two threads on one layer; a view kept after the block
(ResourceWarning, module restored, GPU memory freed once the view goes); a real ``torch.OutOfMemoryError``
inside the block keeps its type; writeback of an edit made on the GPU.

Usage: python benchmarks/gpu_materialize.py   (one GPU, a few hundred MB; ~1 minute)
       DEVICE=cpu python benchmarks/gpu_materialize.py   (a dry run of the same checks on the CPU)
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import traceback
import warnings
from pathlib import Path

import accelerate
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import offload_export as oe

CUDA = torch.device(os.environ.get("DEVICE", "cuda:0"))
ON_GPU = CUDA.type == "cuda"
# dispatch_model / from_pretrained offload "cpu" entries only when the main device is not the string "cpu"
RESIDENT = 0 if ON_GPU else torch.device("cpu")
CONFIG = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=64, vocab_size=512, max_position_embeddings=64,
              tie_word_embeddings=False)
IDS = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))


def make() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG)).eval()


def layouts(tmp: Path):
    yield "cpu_offload", accelerate.cpu_offload(make(), execution_device=CUDA)
    yield "disk_offload", accelerate.disk_offload(make(), str(tmp / "disk"), execution_device=CUDA)
    device_map = {"model.embed_tokens": RESIDENT, "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": RESIDENT, "model.norm": RESIDENT, "model.rotary_emb": RESIDENT, "lm_head": "cpu"}
    yield "dispatch", accelerate.dispatch_model(make(), device_map, main_device=RESIDENT,
                                                offload_dir=str(tmp / "dispatch"))
    make().save_pretrained(tmp / "src")
    resident = 0 if ON_GPU else "cpu"  # safetensors' safe_open rejects torch.device("cpu")
    device_map = {k: ("disk" if v != RESIDENT else resident) for k, v in device_map.items()}
    yield "from_pretrained", AutoModelForCausalLM.from_pretrained(tmp / "src", device_map=device_map,
                                                                   offload_folder=str(tmp / "fp")).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS.to(CUDA)).logits.cpu()


def offloaded(model) -> dict[str, bool]:
    return {k: v.device.type == "meta" for k, v in model.state_dict(keep_vars=True).items()}


def check_layout(name: str, model, reference) -> None:
    layer = model.model.layers[0]
    ref_layer = reference.model.layers[0]
    before, expected = offloaded(model), logits(reference)
    assert any(before.values()), "nothing offloaded"
    with oe.materialized(layer):
        assert all(p.device == CUDA for p in layer.parameters())
        assert torch.equal(layer.mlp.up_proj.weight, ref_layer.mlp.up_proj.weight)
        assert torch.equal(logits(model), expected)
        assert all(p.device == CUDA for p in layer.parameters()), "the forward re-offloaded"
        with oe.materialized(layer.mlp, writeback=True):
            layer.mlp.down_proj.weight.data.mul_(2)  # on the GPU
    with torch.no_grad():
        ref_layer.mlp.down_proj.weight.mul_(2)
    assert offloaded(model) == before
    assert torch.equal(logits(model), logits(reference)), "nested writeback lost"
    a, b = oe.materialized(layer), oe.materialized(layer)
    a.__enter__(), b.__enter__(), a.__exit__(None, None, None)
    assert layer.mlp.up_proj.weight.device == CUDA, "overlap: restored while a block is open"
    b.__exit__(None, None, None)
    assert offloaded(model) == before
    check_threads(model, layer, ref_layer)
    check_view_and_oom(model, layer, before)
    assert torch.equal(logits(model), logits(reference))


def check_threads(model, layer, ref_layer) -> None:
    x = torch.randn(1, 5, CONFIG["hidden_size"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, errors, start = ref_layer.mlp(x.to(CUDA)).cpu(), [], threading.Barrier(2)

    def work():
        try:
            start.wait()
            for _ in range(20):
                with oe.materialized(layer), torch.no_grad():
                    torch.testing.assert_close(layer.mlp(x.to(CUDA)).cpu(), expected)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        threads = [threading.Thread(target=work) for _ in range(2)]
        [t.start() for t in threads], [t.join() for t in threads]
    assert not errors, errors
    assert layer.mlp.up_proj.weight.device.type == "meta"


def allocated() -> int:
    if not ON_GPU:
        return 0
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def check_view_and_oom(model, layer, before) -> None:
    base = allocated()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        with oe.materialized(layer):
            view = layer.mlp.up_proj.weight[0]
    assert any(issubclass(w.category, ResourceWarning) for w in caught), "no ResourceWarning for the view"
    assert offloaded(model) == before and view.device == CUDA
    del view
    assert allocated() == base, "GPU memory not freed after the view went"
    try:
        with oe.materialized(layer, writeback=True):
            torch.empty(1 << 45, dtype=torch.uint8, device=CUDA)  # 32 TiB: a real CUDA OOM
        raise AssertionError("no OutOfMemoryError")
    except (torch.OutOfMemoryError if ON_GPU else RuntimeError) as e:  # the CPU allocator raises RuntimeError
        assert any("materialized(LlamaDecoderLayer)" in n for n in e.__notes__), e.__notes__
    assert offloaded(model) == before and allocated() == base


def check_compressed_tensors() -> None:
    from compressed_tensors.offload import offload_module
    model, reference = make(), make()
    for module in model.modules():
        if module._parameters or module._buffers:
            offload_module(module, CUDA, "cpu")
    proj, ref_proj = model.model.layers[0].mlp.up_proj, reference.model.layers[0].mlp.up_proj
    with oe.materialized(model.model.layers[0]):
        with oe.materialized(proj, writeback=True):
            assert proj.weight is proj.weight and proj.weight.device == CUDA
            proj.weight.data.mul_(3)
    assert torch.equal(proj.weight.cpu(), ref_proj.weight * 3)


def main() -> int:
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in layouts(Path(tmp)):
            failures += run(name, lambda: check_layout(name, model, make().to(CUDA)))  # same kernels as the model
    failures += run("compressed-tensors CPUCache -> cuda", check_compressed_tensors)
    print(f"{failures} failure(s) on {torch.cuda.get_device_name(CUDA) if ON_GPU else 'cpu'}")
    return failures


def run(name: str, check) -> int:
    try:
        check()
        print(f"PASS {name}")
        return 0
    except Exception:  # noqa: BLE001 - report every check
        print(f"FAIL {name}\n{traceback.format_exc()}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
