"""Mixed precision on CPU: the training forward under ``torch.autocast(bfloat16)``.

On a CPU that multiplies bf16 in hardware (AMX tiles: Intel Sapphire Rapids and later; or
AVX-512 BF16: Intel Cooper Lake, AMD Zen 4 and later) oneDNN runs the convolutions and matrix
products that make up most of a stage-1 or stage-2 step in bf16. The text tower runs in bf16
too, with eager attention (``reir.model.modeling.TextEncoder``: the fused flash-attention
kernel's bf16 backward over short padded expressions was 3x slower than fp32); the losses read
the model's outputs cast back to fp32. Measured on 2-core machines (`small`, batch 16,
stage 2, same-time interleaved runs, ``bench/results/train-cpu-bf16-2cpu-2026-11-28.json``):
on an Intel Xeon with AMX, 0.52-0.53 s a step against 0.63-0.67 s in fp32 through
``run_training`` (text tower then in fp32); on an AMD EPYC with AVX-512 BF16, 0.33-0.40 s
against 0.49-0.58 s in plain torch. Without either, bf16 is emulated and slower than fp32, so
``cpu_bf16: auto`` leaves such a CPU in fp32.

GPU training is unchanged: DeepSpeed's bf16 mode (``TrainConfig.bf16``), no autocast.
"""

from __future__ import annotations

import torch

from reir.training.config import CpuBf16


def cpu_multiplies_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX tiles or AVX-512 BF16), as torch sees it."""
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        probe = getattr(torch.cpu, name, None)
        try:
            if callable(probe) and probe():
                return True
        except RuntimeError:  # a build without the probe's backend
            continue
    return False


def cpu_autocast_enabled(mode: CpuBf16, device: torch.device | str) -> bool:
    """Whether a training step on ``device`` runs its forward under bf16 autocast."""
    if torch.device(device).type != "cpu" or mode == "off":
        return False
    return mode == "on" or cpu_multiplies_bf16()


def training_autocast(enabled: bool) -> torch.autocast:
    """The context a training forward runs in: bf16 autocast on CPU when ``enabled`` (see
    :func:`cpu_autocast_enabled`), else a context that changes nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)
