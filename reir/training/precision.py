"""Mixed precision on CPU: the training forward under ``torch.autocast(bfloat16)``.

On a CPU with AMX tiles (Intel Sapphire Rapids and later) oneDNN multiplies and convolves
bf16 in hardware, and the convolutions and matrix products that make up most of a stage-1
or stage-2 step run about twice as fast. Two parts stay in fp32 (in ``reir.model``): the
text tower, whose flash-attention backward over short padded expressions took 22 ms a call in
bf16 against 7 ms in fp32, and the losses, which read the model's outputs cast back to fp32.
Measured on the 2-core machine (`small`, batch 16, stage 2, same-time interleaved runs through
``run_training``): 0.52-0.53 s a step against 0.63-0.67 s in fp32, 1.24x
(``bench/results/train-cpu-bf16-2cpu-2026-11-28.json``). Without AMX, bf16 is emulated and
slower than fp32, so ``cpu_bf16: auto`` leaves such a CPU in fp32.

GPU training is unchanged: DeepSpeed's bf16 mode (``TrainConfig.bf16``), no autocast.
"""

from __future__ import annotations

import torch

from reir.training.config import CpuBf16


def cpu_has_bf16_tiles() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX tiles), as torch sees it."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if callable(probe) else False
    except RuntimeError:  # a build without the probe's backend
        return False


def cpu_autocast_enabled(mode: CpuBf16, device: torch.device | str) -> bool:
    """Whether a training step on ``device`` runs its forward under bf16 autocast."""
    if torch.device(device).type != "cpu" or mode == "off":
        return False
    return mode == "on" or cpu_has_bf16_tiles()


def training_autocast(enabled: bool) -> torch.autocast:
    """The context a training forward runs in: bf16 autocast on CPU when ``enabled`` (see
    :func:`cpu_autocast_enabled`), else a context that changes nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)
