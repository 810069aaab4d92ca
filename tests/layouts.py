"""Test fixtures building *real* accelerate offload layouts of tiny HF causal LMs.

Everything here goes through the genuine accelerate / transformers code paths
(``cpu_offload``, ``disk_offload``, ``dispatch_model``, ``from_pretrained(device_map=...)``
and hand-built ``AlignDevicesHook``s); nothing is mocked.  On a CPU-only machine the
execution device is always the CPU, which needs a few tricks to obtain *genuinely*
offloaded "cpu" entries (see ``_apply_dispatch`` / ``_apply_from_pretrained``).

Import from tests as ``from layouts import ...`` (pytest's rootdir-relative
``sys.path`` insertion makes ``tests/`` importable since it has no ``__init__.py``).

Surprises found while reading/using accelerate 1.15 + transformers 5.24 (CPU only)
------------------------------------------------------------------------------------
* ``dispatch_model`` treats ``"cpu"`` device-map entries as *resident* whenever
  ``main_device == "cpu"`` (the default when the map only holds "cpu"/"disk").  It tests
  ``main_device != "cpu"`` and ``main_device == "cpu"`` with plain ``==``; a
  ``torch.device("cpu")`` does not compare equal to the string ``"cpu"``, so passing
  ``main_device=torch.device("cpu")`` makes "cpu" entries really offloaded (their tensors
  go to ``OffloadedWeightsLoader.state_dict``, the module tensors become meta).
  Residents are then spelled ``torch.device("cpu")`` in the device map.
* The same trick through ``from_pretrained``: a device map whose values mix the string
  ``"cpu"`` with ``torch.device("cpu")`` makes accelerate pick ``torch.device("cpu")`` as
  main device, so the "cpu" strings are offloaded.  It only works WITHOUT "disk"
  entries: with disk entries transformers passes an ``offload_index``, accelerate then
  builds ``OffloadedWeightsLoader(device=main_device)`` and ``safetensors.safe_open``
  rejects ``device=torch.device("cpu")`` ("device device(type='cpu') is invalid";
  "cpu:0" is rejected too).  Hence from_pretrained layouts are either
  resident+disk or resident+cpu, never all three.
* transformers 5 never writes ``.dat`` memmaps: "disk" entries point straight into the
  user's ``model.safetensors`` (index entries ``{"safetensors_file", "weight_name",
  "dtype"}``), except weights changed by a load-time ``WeightConverter`` (the fused
  Qwen3-MoE ``experts.gate_up_proj`` / ``experts.down_proj``), which are re-saved as one
  ``<name>.safetensors`` file each into ``offload_folder``.  If the reload dtype differs
  from the saved one, the index entry carries the *new* dtype and the loader casts on
  every read.  For tied Qwen3 the ``lm_head.weight`` index entry reuses the
  ``model.embed_tokens.weight`` entry (``weight_name`` differs from the key!).
* ``PrefixedDataset.__iter__`` yields the *full* (prefixed) keys of the underlying
  dataset, while ``__getitem__`` expects keys *relative* to the prefix, so
  ``for k in wm: wm[k]`` raises KeyError.  ``PrefixedDataset.__len__`` returns the length
  of the whole underlying dataset, not of the prefixed subset.
* ``cpu_offload(model)`` (``state_dict=None``) builds its store as
  ``{n: p.to("cpu") for n, p in model.state_dict().items()}``; on CPU ``.to("cpu")`` is a
  no-op, so the weights_map tensors ARE the model's former CPU tensors (detached views of
  the same storage; tied keys are two views of one storage).  The module parameters are replaced by fresh meta
  Parameters, so the model no longer references them, but any Parameter object taken from
  the model *before* ``apply_layout`` still shares storage with the store.  That is why
  the reference in ``draw_offloaded`` is an independently built twin, never the model
  that was offloaded.
* ``set_module_tensor_to_device`` never writes in place: every pre_forward/post_forward
  installs NEW Parameter objects (meta after the forward).  So tied parameters lose their
  ``is``-identity as soon as both ends are offloaded (``retie_parameters`` only reties to
  a non-meta parameter), and Parameter objects held across a forward are stale.  During a
  forward on CPU the onloaded Parameter wraps the very tensor stored in the weights_map
  (``value.to("cpu")`` is a no-op), so in-place edits of onloaded params would corrupt the
  store.
* With a tied model where only one end is offloaded, ``dispatch_model`` reties the
  offloaded end to the *resident* Parameter after attaching hooks, so before the first
  forward that key is not on meta; after a forward the post_forward hook puts a meta
  Parameter there.  We avoid that ambiguity by always placing ``lm_head`` like
  ``model.embed_tokens`` for tied models (as ``infer_auto_device_map`` does).
* ``add_hook_to_module(..., append=True)`` detaches the old hook and re-runs the
  ``init_hook`` of EVERY hook in the new ``SequentialHook`` on the already-offloaded
  module: an offloading hook re-records ``original_devices`` as meta, and a
  non-offloading hook with an ``execution_device`` crashes on a leaf whose direct tensors
  are meta ("we need a `value`").  The appended io hook therefore has no execution_device.
* Qwen3 rotary buffers (``inv_freq``/``original_inv_freq``) are non-persistent: they are
  not in the state dict and are never offloaded (``remove_non_persistent=True``), so
  ``offload_buffers`` has no visible effect on the state dict of these models; it only
  changes which hook code paths run.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import torch
from torch import nn

import accelerate
from accelerate.hooks import AlignDevicesHook, ModelHook, SequentialHook, add_hook_to_module
from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset, offload_state_dict
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel, Qwen3Config, Qwen3MoeConfig

from offload_export.quiet import quiet_libraries  # the same silencing the demo uses

__all__ = [
    "MODEL_KINDS",
    "METHODS",
    "N_LAYERS",
    "LayoutSpec",
    "LayoutArtifacts",
    "make_model",
    "layout_specs",
    "apply_layout",
    "apply_layout_with_artifacts",
    "resident_state_dict",
    "offloaded_keys",
    "offload_hooks",
    "draw_offloaded",
    "fixed_input_ids",
    "forward_logits",
]

MODEL_KINDS = ("qwen3_tied", "llama_untied", "qwen3_moe")
# Ordered from simplest to most involved so that hypothesis shrinks towards "resident".
METHODS = ("resident", "cpu_offload", "disk_offload", "dispatch", "place_submodules", "from_pretrained")
N_LAYERS = 2
VOCAB = 128
PLACES = ("resident", "cpu", "disk")

_COMMON = dict(
    hidden_size=64,
    num_hidden_layers=N_LAYERS,
    vocab_size=VOCAB,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=96,
    max_position_embeddings=64,
    initializer_range=0.1,  # larger than the 0.02 default so activations are not ~0
)


def _config(kind: str):
    if kind == "qwen3_tied":
        return Qwen3Config(tie_word_embeddings=True, **_COMMON)
    if kind == "llama_untied":
        return LlamaConfig(tie_word_embeddings=False, **_COMMON)
    if kind == "qwen3_moe":
        return Qwen3MoeConfig(
            tie_word_embeddings=False,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            **_COMMON,
        )
    raise ValueError(f"unknown model kind {kind!r}; expected one of {MODEL_KINDS}")


def make_model(kind: str, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> PreTrainedModel:
    """Tiny deterministic causal LM (hidden 64, 2 layers, vocab 128) in eval mode.

    Weights come from transformers' own init under ``torch.manual_seed(seed)``; then every
    RMSNorm weight (and any parameter that came out constant, e.g. a zero-initialised
    router) gets deterministic noise, so loading a norm wrongly changes the output.
    Same (kind, dtype, seed) -> bitwise identical weights.
    """
    cfg = _config(kind)
    torch.manual_seed(seed)
    with quiet_libraries():
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    gen = torch.Generator().manual_seed(10_007 + seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name:
                p.add_((0.1 * noise).to(p.dtype))
            elif p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                p.add_((cfg.initializer_range * noise).to(p.dtype))
    model.eval()
    return model


# --------------------------------------------------------------------------- specs


@dataclasses.dataclass(frozen=True)
class LayoutSpec:
    """Hashable description of an offload layout.

    method:
        "resident" | "cpu_offload" | "disk_offload" | "dispatch" | "place_submodules" | "from_pretrained"
    placement:
        ((module_name, "resident"|"cpu"|"disk"), ...) covering every state-dict key exactly
        once (units: embed_tokens, each decoder layer or its self_attn / mlp (or, for MoE,
        mlp.gate / mlp.experts) / layernorms, norm, lm_head).  Empty for resident,
        cpu_offload and disk_offload (whole model).
    offload_buffers:
        forwarded to accelerate.
    load_dtype:
        from_pretrained only: dtype name to reload with (None = same as saved).
    append_hook:
        place_submodules only: None (single AlignDevicesHook per unit), "before" (a
        non-offloading io hook is installed first and the offloading hook appended ->
        ``SequentialHook(io, offload)``) or "after" (offloading hook first, io hook appended
        -> ``SequentialHook(offload, io)``).
    """

    method: str
    placement: tuple[tuple[str, str], ...] = ()
    offload_buffers: bool = False
    load_dtype: Optional[str] = None
    append_hook: Optional[str] = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}")
        for _, place in self.placement:
            if place not in PLACES:
                raise ValueError(f"unknown placement {place!r}")
        places = self.places
        if self.method == "from_pretrained" and "cpu" in places and "disk" in places:
            raise ValueError("from_pretrained cannot mix offloaded 'cpu' and 'disk' entries on a CPU-only host")
        if self.append_hook not in (None, "before", "after"):
            raise ValueError(f"bad append_hook {self.append_hook!r}")

    @property
    def places(self) -> set[str]:
        return {p for _, p in self.placement}

    @property
    def placement_dict(self) -> dict[str, str]:
        return dict(self.placement)

    @property
    def offloads_something(self) -> bool:
        """Whether the layout must leave at least one state-dict key on meta."""
        if self.method in ("cpu_offload", "disk_offload"):
            return True
        return bool(self.places & {"cpu", "disk"})

    def __repr__(self) -> str:  # compact, for hypothesis failure reports
        parts = [f"method={self.method!r}"]
        if self.placement:
            parts.append("placement={" + ", ".join(f"{k!r}: {v!r}" for k, v in self.placement) + "}")
        parts.append(f"offload_buffers={self.offload_buffers}")
        if self.load_dtype is not None:
            parts.append(f"load_dtype={self.load_dtype!r}")
        if self.append_hook is not None:
            parts.append(f"append_hook={self.append_hook!r}")
        return "LayoutSpec(" + ", ".join(parts) + ")"


def _layer_subunits(kind: str, i: int, split_moe: bool) -> list[str]:
    p = f"model.layers.{i}"
    mlp = [f"{p}.mlp.gate", f"{p}.mlp.experts"] if (kind == "qwen3_moe" and split_moe) else [f"{p}.mlp"]
    return [f"{p}.self_attn", *mlp, f"{p}.input_layernorm", f"{p}.post_attention_layernorm"]


@st.composite
def _placements(draw, kind: str, allowed: tuple[str, ...], *, force_whole_layer0: bool = False):
    units: list[str] = ["model.embed_tokens"]
    for i in range(N_LAYERS):
        split = False if (force_whole_layer0 and i == 0) else draw(st.booleans())
        if split:
            units += _layer_subunits(kind, i, draw(st.booleans()))
        else:
            units.append(f"model.layers.{i}")
    units += ["model.norm", "lm_head"]
    placement = {u: draw(st.sampled_from(allowed), label=u) for u in units}
    if force_whole_layer0:
        placement["model.layers.0"] = draw(st.sampled_from([p for p in allowed if p != "resident"]))
    if kind == "qwen3_tied":
        # tied weights share a placement, as infer_auto_device_map guarantees
        placement["lm_head"] = placement["model.embed_tokens"]
    return tuple(placement.items())


def layout_specs(kind: str) -> st.SearchStrategy[LayoutSpec]:
    """Hypothesis strategy of LayoutSpec for ``kind`` covering every method."""
    if kind not in MODEL_KINDS:
        raise ValueError(kind)
    ob = st.booleans()
    all_places = ("resident", "cpu", "disk")
    strategies = {
        "resident": st.just(LayoutSpec("resident")),
        "cpu_offload": st.builds(LayoutSpec, st.just("cpu_offload"), offload_buffers=ob),
        "disk_offload": st.builds(LayoutSpec, st.just("disk_offload"), offload_buffers=ob),
        "dispatch": st.builds(LayoutSpec, st.just("dispatch"), _placements(kind, all_places), offload_buffers=ob),
        "place_submodules": st.builds(
            LayoutSpec,
            st.just("place_submodules"),
            _placements(kind, all_places, force_whole_layer0=True),
            offload_buffers=ob,
            append_hook=st.sampled_from([None, "before", "after"]),
        ),
        "from_pretrained": st.sampled_from([("resident", "disk"), ("resident", "cpu")]).flatmap(
            lambda allowed: st.builds(
                LayoutSpec,
                st.just("from_pretrained"),
                _placements(kind, allowed),
                offload_buffers=ob,
                load_dtype=st.sampled_from([None, "bfloat16"]),
            )
        ),
    }
    return st.sampled_from(METHODS).flatmap(lambda m: strategies[m])


# --------------------------------------------------------------------------- apply


@dataclasses.dataclass
class LayoutArtifacts:
    """Where apply_layout put things (paths are None when unused)."""

    workdir: Path
    offload_dir: Optional[Path] = None  # .dat memmaps (disk_offload / dispatch / place_submodules) or
    #                                     transformers' offload_folder (from_pretrained)
    source_dir: Optional[Path] = None  # from_pretrained: the save_pretrained directory
    source_file: Optional[Path] = None  # from_pretrained: source model.safetensors
    device_map: Optional[dict] = None  # the exact device map given to accelerate/transformers
    store: Optional[dict] = None  # place_submodules: the plain dict holding "cpu" tensors


def _check_covers(model: nn.Module, placement: dict[str, str]) -> None:
    keys = list(model.state_dict().keys())
    for k in keys:
        owners = [u for u in placement if k == u or k.startswith(u + ".")]
        if len(owners) != 1:
            raise AssertionError(f"state-dict key {k!r} covered by {owners} in placement")


def _apply_dispatch(model, spec, work: Path, art: LayoutArtifacts):
    placement = spec.placement_dict
    _check_covers(model, placement)
    cpu = torch.device("cpu")
    # Residents as torch.device("cpu"), offloaded-to-RAM as the *string* "cpu" (+ "disk").
    # main_device=torch.device("cpu") != "cpu" inside dispatch_model -> "cpu" entries are
    # really offloaded into OffloadedWeightsLoader.state_dict (see module docstring).
    device_map = {u: (cpu if p == "resident" else p) for u, p in placement.items()}
    device_map["model.rotary_emb"] = cpu
    offload_dir = None
    if "disk" in spec.places:
        offload_dir = work / "offload"
        art.offload_dir = offload_dir
    art.device_map = dict(device_map)
    return accelerate.dispatch_model(
        model,
        device_map,
        main_device=cpu,
        offload_dir=None if offload_dir is None else str(offload_dir),
        offload_buffers=spec.offload_buffers,
    )


def _io_hook() -> AlignDevicesHook:
    # Same shape as the hook cpu_offload puts on the root module.  execution_device must
    # stay None: appending re-runs every init_hook of the chain, and a non-offloading hook
    # with an execution_device would try to move the (now meta) direct tensors of a leaf
    # unit such as model.norm -> "weight is on the meta device, we need a `value`".
    return AlignDevicesHook(io_same_device=True)


def _apply_place_submodules(model, spec, work: Path, art: LayoutArtifacts):
    placement = spec.placement_dict
    _check_covers(model, placement)
    sd = model.state_dict()
    # RAM store: clones, so the store does not share storage with the (soon meta) model
    # tensors; tied keys keep aliasing one clone, like a real state dict.
    clones: dict[int, torch.Tensor] = {}
    cpu_store: dict[str, torch.Tensor] = {}
    disk_sd: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        unit = next(u for u in placement if k == u or k.startswith(u + "."))
        if placement[unit] == "cpu":
            key = v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)
            if key not in clones:
                clones[key] = v.detach().clone()
            cpu_store[k] = clones[key]
        elif placement[unit] == "disk":
            disk_sd[k] = v
    art.store = cpu_store
    disk_loader = None
    if disk_sd:
        art.offload_dir = work / "offload"
        offload_state_dict(str(art.offload_dir), disk_sd)
        disk_loader = OffloadedWeightsLoader(save_folder=str(art.offload_dir))
    for unit, place in spec.placement:
        if place == "resident":
            continue
        module = model.get_submodule(unit)
        dataset = cpu_store if place == "cpu" else disk_loader
        hook = AlignDevicesHook(
            execution_device="cpu",
            offload=True,
            weights_map=PrefixedDataset(dataset, unit + "."),
            place_submodules=True,
            offload_buffers=spec.offload_buffers,
        )
        if spec.append_hook == "before":
            add_hook_to_module(module, _io_hook())
            add_hook_to_module(module, hook, append=True)
        else:
            add_hook_to_module(module, hook)
            if spec.append_hook == "after":
                add_hook_to_module(module, _io_hook(), append=True)
    return model


def _apply_from_pretrained(model, spec, work: Path, art: LayoutArtifacts):
    src = work / "src"
    model.save_pretrained(str(src))
    art.source_dir = src
    art.source_file = src / "model.safetensors"
    offload_folder = work / "offload"
    art.offload_dir = offload_folder
    placement = spec.placement_dict
    cpu = torch.device("cpu")
    if "cpu" in spec.places:
        # CPU-offload through from_pretrained (only possible without disk entries):
        # residents spelled torch.device("cpu"), offloaded ones the string "cpu"; rotary_emb
        # is always a torch.device entry so the map has >1 distinct value and gets dispatched.
        device_map = {u: (cpu if p == "resident" else "cpu") for u, p in placement.items()}
        device_map["model.rotary_emb"] = cpu
    else:
        # "cpu" is resident here (main_device == "cpu"); "disk" entries index the source file.
        device_map = {u: ("cpu" if p == "resident" else "disk") for u, p in placement.items()}
        device_map["model.rotary_emb"] = "cpu"
    art.device_map = dict(device_map)
    dtype = getattr(torch, spec.load_dtype) if spec.load_dtype else model.dtype
    out = AutoModelForCausalLM.from_pretrained(
        str(src),
        device_map=device_map,
        offload_folder=str(offload_folder),
        offload_buffers=spec.offload_buffers,
        dtype=dtype,
    )
    out.eval()
    return out


def apply_layout_with_artifacts(model: nn.Module, spec: LayoutSpec, tmp_dir) -> tuple[nn.Module, LayoutArtifacts]:
    """Like apply_layout, also returning where files/stores went.

    ``model`` is consumed: all methods but from_pretrained hook it in place (its tensors
    become meta); from_pretrained saves it and returns a NEW model (``model`` untouched).
    Every call uses a fresh sub-directory of ``tmp_dir`` so one tmp dir can serve many
    hypothesis examples.
    """
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{spec.method}-", dir=tmp_dir))
    art = LayoutArtifacts(workdir=work)
    with quiet_libraries():
        if spec.method == "resident":
            out = model
        elif spec.method == "cpu_offload":
            # Default store: {n: p.to("cpu")} == the model's own CPU tensors (see docstring).
            out = accelerate.cpu_offload(model, execution_device="cpu", offload_buffers=spec.offload_buffers)
        elif spec.method == "disk_offload":
            art.offload_dir = work / "offload"
            out = accelerate.disk_offload(
                model, str(art.offload_dir), execution_device="cpu", offload_buffers=spec.offload_buffers
            )
        elif spec.method == "dispatch":
            out = _apply_dispatch(model, spec, work, art)
        elif spec.method == "place_submodules":
            out = _apply_place_submodules(model, spec, work, art)
        elif spec.method == "from_pretrained":
            out = _apply_from_pretrained(model, spec, work, art)
        else:  # pragma: no cover - guarded by LayoutSpec
            raise ValueError(spec.method)
    return out, art


def apply_layout(model: nn.Module, spec: LayoutSpec, tmp_dir) -> nn.Module:
    """Return ``model`` laid out per ``spec`` (a new object for from_pretrained)."""
    return apply_layout_with_artifacts(model, spec, tmp_dir)[0]


# --------------------------------------------------------------------------- inspect


def resident_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Cloned CPU state dict of a fully resident model (the reference)."""
    out = {}
    for k, v in model.state_dict().items():
        if v.device.type == "meta":
            raise ValueError(f"{k} is on meta: model is not resident")
        out[k] = v.detach().to("cpu", copy=True)
    return out


def offloaded_keys(model: nn.Module) -> set[str]:
    """State-dict keys whose module tensor currently lives on the meta device."""
    return {k for k, v in model.state_dict(keep_vars=True).items() if v.device.type == "meta"}


def _unwrap(hook: ModelHook) -> list[ModelHook]:
    if isinstance(hook, SequentialHook):
        return [h for sub in hook.hooks for h in _unwrap(sub)]
    return [hook]


def offload_hooks(model: nn.Module) -> Iterator[tuple[str, AlignDevicesHook]]:
    """(module_name, hook) for every offloading AlignDevicesHook, SequentialHooks unwrapped."""
    for name, module in model.named_modules():
        hook = getattr(module, "_hf_hook", None)
        if hook is None:
            continue
        for h in _unwrap(hook):
            if isinstance(h, AlignDevicesHook) and h.offload:
                yield name, h


# --------------------------------------------------------------------------- convenience


def fixed_input_ids(batch: int = 2, seq: int = 7, seed: int = 1234) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=gen)


@torch.no_grad()
def forward_logits(model: nn.Module, input_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    if input_ids is None:
        input_ids = fixed_input_ids()
    return model(input_ids=input_ids, use_cache=False).logits


def _cast_params_like_from_pretrained(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast floating parameters only: from_pretrained(dtype=...) keeps fp32 rotary buffers,
    whereas ``model.to(dtype)`` would cast them too."""
    with torch.no_grad():
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and p.is_floating_point() and p.dtype != dtype:
                    p.data = p.data.to(dtype)
    model.config.dtype = dtype
    return model


def draw_offloaded(
    kind: str, spec: LayoutSpec, tmp_dir, *, dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[PreTrainedModel, nn.Module]:
    """(reference_model, offloaded_model): an independent resident twin with identical
    weights (cast to ``spec.load_dtype`` for from_pretrained reloads) and the laid-out model."""
    reference = make_model(kind, dtype=dtype, seed=seed)
    if spec.method == "from_pretrained" and spec.load_dtype is not None:
        _cast_params_like_from_pretrained(reference, getattr(torch, spec.load_dtype))
    offloaded = apply_layout(make_model(kind, dtype=dtype, seed=seed), spec, tmp_dir)
    return reference, offloaded
