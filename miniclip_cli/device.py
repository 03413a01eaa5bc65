"""Pick the compute device once: CUDA, then Apple MPS, then CPU."""

from __future__ import annotations

import torch

from .errors import DeviceError


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda" or requested.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {requested}: no CUDA GPU is visible to PyTorch; use --device auto or cpu")
        try:
            device = torch.device(requested)
        except RuntimeError:
            raise DeviceError(f"--device {requested!r} is not a device name; use cuda, cuda:0, cuda:1, ...") from None
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"--device {requested}: PyTorch sees {count} GPU(s), numbered from cuda:0; "
                              "pick one of those, or use --device auto or cpu")
        return device
    if requested == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError("--device mps: Apple MPS is not available here; use --device auto or cpu")
        return torch.device("mps")
    raise DeviceError(f"--device {requested!r} is not known; use auto, cpu, cuda or mps")


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`, or None for plain fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    # auto: bf16 where it is native and fast. A training step under bf16 autocast took 0.6x the fp32 time on
    # CPUs with AVX-512 BF16 (AMD Zen 4) but 2.4x on AVX-512 without it (Intel Cascade Lake), so
    # the CPU test is for the bf16 instructions themselves (or AMX), not AVX-512. MPS autocast support is
    # patchy, so it stays fp32.
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_bf16() else None
    return None


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively: AVX-512 BF16 or AMX (torch.cpu's own checks, private but
    present since torch 2.3; without them, no)."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in checks)
