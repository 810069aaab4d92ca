"""NVFP4 weight packing with ModelOpt's numerics, in fewer passes and without waiting for the GPU.

ModelOpt's ``NVFP4QTensor`` (the functions its export calls for a weight) copies a clone of the weight to find the
block maxima, and its E2M1 cast indexes its bounds with a Python list on every call (a copy from pageable host
memory, which waits for everything queued on the GPU) and makes an int32 and three boolean temporaries of the
weight's size. :func:`pack` computes the same bits with neither: the pack thread keeps queueing work while the GPU
packs, and on the CPU the cast is several times faster. The callers pack the first module of each kind both ways
and fall back to ModelOpt's export where the bits differ, so a ModelOpt whose numerics change is followed, not
contradicted.
"""

from __future__ import annotations

import torch

__all__ = ["e2m1_codes", "pack"]

_E2M1_MAX = 6.0
_E4M3_MAX = 448.0
_E4M3_MIN_SCALE = 2.0 ** -9  # ModelOpt clamps block scales here: smaller ones would flush to zero in E4M3
# E2M1 magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 (codes 0-7), rounded to nearest, ties to the even code: a magnitude
# rounds up past the midpoint below an odd code only when above it, past the one below an even code when at it too
_TIE_DOWN = (0.25, 1.25, 2.5, 5.0)
_TIE_UP = (0.75, 1.75, 3.5)


def e2m1_codes(scaled: torch.Tensor) -> torch.Tensor:
    """4-bit E2M1 codes (sign bit 3, magnitude code 0-7) of float ``scaled``, one per byte, as ModelOpt's
    ``NVFP4QTensor._cast_fp4`` gives them (NaN and infinities: the largest magnitude). ``scaled`` is overwritten.

    Args:
        scaled: float32 values already divided by their block's scale.

    Returns:
        A uint8 tensor of ``scaled``'s shape.
    """
    codes = (scaled < 0).to(torch.uint8) << 3
    magnitude = scaled.abs_()
    # 7 less the midpoints a magnitude does not pass: NaN passes every one, as in ModelOpt's binary search
    kept = (magnitude <= _TIE_DOWN[0]).to(torch.uint8)
    for bound in _TIE_DOWN[1:]:
        kept += magnitude <= bound
    for bound in _TIE_UP:
        kept += magnitude < bound
    return codes.add_(7).sub_(kept)


def pack(weight: torch.Tensor, block: int, scale_2: torch.Tensor,
         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` packed as ModelOpt's export packs an NVFP4 weight with per-tensor scale ``scale_2``
    (``weight_scale_2``): its per-block ``weight_scale`` from ``weight`` as it is, the E2M1 codes from ``weight`` in
    ``dtype``, two codes a byte, the even column in the low nibble.

    Args:
        weight: the weight, or a stack of experts' weights; the last dimension a multiple of ``block``.
        block: the block size along the last dimension (16 for NVFP4).
        scale_2: float32, 0-d, or one per expert broadcastable over ``weight``'s blocks (``(experts, 1, 1)``).
        dtype: the dtype ModelOpt casts the weight to before dividing it by its scales.

    Returns:
        The packed weight (uint8, last dimension halved) and the per-block scales (float8_e4m3fn, last dimension
        divided by ``block``), on ``weight``'s device.

    Raises:
        ValueError: the last dimension is not a multiple of ``block``.
    """
    if weight.shape[-1] % block:
        raise ValueError(f"NVFP4: a weight of shape {tuple(weight.shape)} is not made of blocks of {block} "
                         f"along its last dimension")
    blocks = weight.reshape(*weight.shape[:-1], -1, block)
    block_max = torch.maximum(blocks.amax(-1).abs(), blocks.amin(-1).abs()).float()
    scales = block_max / (_E2M1_MAX * scale_2)
    scales = scales.masked_fill_(scales == 0, 1.0).clamp_(_E4M3_MIN_SCALE, _E4M3_MAX).to(torch.float8_e4m3fn)
    del block_max
    scaled = weight.to(dtype).reshape(blocks.shape) / (scales.to(torch.float32) * scale_2).unsqueeze(-1)
    codes = e2m1_codes(scaled.view(weight.shape))
    del scaled
    return (codes[..., 1::2] << 4).bitwise_or_(codes[..., 0::2]), scales
