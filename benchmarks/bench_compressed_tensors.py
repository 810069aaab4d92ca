"""CPU timing of format='compressed-tensors' vs llm-compressor's own save path, same model, same bytes.

A 12-layer Llama (hidden 1024, vocab 16000, bf16, ~333 MB) with a compressed-tensors preset calibrated from
min/max: llm-compressor's path (deepcopy, compress_model, save_pretrained, update_config) on the resident
model, then save_clean(format="compressed-tensors") resident and disk-offloaded, and the fake-quant export
of the offloaded model for scale; every output is compared with llm-compressor's, tensor by tensor.
Run with OMP_NUM_THREADS=1 on a shared machine (thread contention distorts small per-module ops).

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_compressed_tensors.py W4A16 FP8 [NVFP4]
"""
import copy, json, sys, time, tempfile, shutil
sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
import torch
from pathlib import Path
from transformers import AutoModelForCausalLM, LlamaConfig
import offload_export as oe
from gpu_compressed_tensors import calibrate, compare
from compressed_tensors.compressors import ModelCompressor
from accelerate import disk_offload
work = Path(tempfile.mkdtemp())
config = LlamaConfig(vocab_size=16000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                     num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=False)
for preset in sys.argv[1:]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    calibrate(model, preset)
    t = time.perf_counter(); twin = copy.deepcopy(model); mc = ModelCompressor.from_pretrained_model(twin); mc.compress_model(twin)
    twin.save_pretrained(work / f"ref{preset}"); mc.update_config(work / f"ref{preset}"); ref_s = time.perf_counter() - t
    del twin
    t = time.perf_counter(); r = oe.save_clean(model, work / f"res{preset}", format="compressed-tensors"); res_s = time.perf_counter() - t
    model = disk_offload(model, str(work / f"off{preset}"), execution_device=torch.device("cpu"))
    t = time.perf_counter(); oe.save_clean(model, work / f"disk{preset}", format="compressed-tensors"); disk_s = time.perf_counter() - t
    t = time.perf_counter(); oe.save_clean(model, work / f"fq{preset}"); fq_s = time.perf_counter() - t
    print(json.dumps({"preset": preset, "MB": round(r.bytes / 1e6, 1), "llm_compressor_resident_s": round(ref_s, 2),
                      "ours_resident_s": round(res_s, 2), "ours_disk_offloaded_s": round(disk_s, 2), "fake_quant_disk_offloaded_s": round(fq_s, 2),
                      "eq_resident": compare(work / f"res{preset}", work / f"ref{preset}")["mismatched"],
                      "eq_disk": compare(work / f"disk{preset}", work / f"ref{preset}")["mismatched"]}), flush=True)
shutil.rmtree(work)
