"""Device helpers of the GPU benchmarks (``bench/gpu_suite.py``), device-agnostic: ``torch.accelerator`` where it
exists, the process's resident high-water mark on CPU; and the datasheet peaks that MFU divides by."""

from __future__ import annotations

import gc
import platform
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

GIB = 2**30

# Vendor datasheet figures, TFLOP/s of dense (no 2:4 sparsity) bf16 tensor-core math; SXM boards unless the name says
# otherwise. Matched as substrings of the device name in this order (the more specific names first). The A10G entry
# is the A10 datasheet figure.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200 NVL", 835.0), ("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0),
    ("A100", 312.0), ("L40S", 362.0), ("RTX 4090", 165.0), ("A10G", 125.0))


def _accel(name: str) -> Callable | None:
    return getattr(torch.accelerator, name, None) or getattr(torch.cuda, name, None)


def synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type != "cpu" and _accel("empty_cache"):
        _accel("empty_cache")()


def reset_peak(device: torch.device) -> None:
    synchronize(device)
    if device.type != "cpu":
        _accel("reset_peak_memory_stats")()
        return
    try:  # Linux: resets VmHWM to the current resident set
        Path("/proc/self/clear_refs").write_text("5", encoding="ascii")
    except OSError:
        pass


def read_peak_gib(device: torch.device) -> float | None:
    if device.type != "cpu":
        return _accel("max_memory_allocated")() / GIB
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cpu":
        return platform.processor() or platform.machine() or "cpu"
    try:
        return torch.get_device_module(device).get_device_name(device)
    except (AttributeError, RuntimeError):
        return str(device)


def peak_tflops(name: str, override: float | None) -> tuple[float | None, str]:
    if override is not None:
        return override, "--peak-tflops"
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return value, f"table ({key})"
    return None, "unknown device: MFU n/a (give --peak-tflops)"


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """bf16: autocast (parameters stay fp32, as Lightning's bf16-mixed); fp32: nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def fused_adamw_supported(device: torch.device) -> bool:
    """Whether ``AdamW(fused=True)`` steps on this device (checked on a one-element parameter)."""
    try:
        probe = torch.zeros(1, device=device, requires_grad=True)
        probe.grad = torch.zeros_like(probe)
        torch.optim.AdamW([probe], fused=True).step()
        return True
    except (RuntimeError, ValueError, TypeError):
        return False
