"""Where and how a computation runs: the device, the precision of its matrix products, CPU threads."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class DeviceError(ValueError):
    """A --device or --precision that this machine cannot give, or that the command does not take."""


PRECISIONS = ("auto", "fp32", "bf16")  # of the heads' matrix products; weights, loss and metrics stay fp32


def resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DeviceError(f"--device {device}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {device}: CUDA is not available here; use --device cpu")
    return dev


def bf16_fast(device) -> bool:
    """Whether `device` multiplies bf16 matrices natively: a CUDA GPU with bf16, or a CPU with AMX or
    AVX512-BF16. Elsewhere bf16 is emulated, slower than fp32, so `--precision auto` keeps fp32."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    capability = torch.backends.cpu.get_cpu_capability().upper()  # "AVX512" says nothing about bf16
    if "AMX" in capability or "BF16" in capability:
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def compute_dtype(precision: str, device):
    """The dtype of the matrix products for --precision on `device`: torch.bfloat16, or None for fp32."""
    import torch

    if precision == "fp32" or (precision == "auto" and not bf16_fast(device)):
        return None
    if precision not in ("auto", "bf16"):
        raise DeviceError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    if torch.device(device).type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"--precision bf16: {device} does not support bfloat16; use --precision fp32")
    return torch.bfloat16


def to_device(batch: Mapping, device) -> dict:
    """A batch dict on `device`: tensors, and the (frames, lengths) pairs of frame inputs."""
    return {k: tuple(t.to(device, non_blocking=True) for t in v) if isinstance(v, tuple)
            else v.to(device, non_blocking=True) for k, v in batch.items()}


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run with n torch threads, then give back the number there was (it is process-wide).
    n None or 0: torch's own number, unchanged."""
    import torch

    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fused_adamw_ok(device) -> bool:
    """Fused AdamW (one kernel for all parameters) is much cheaper per step on CPU and CUDA alike."""
    import torch

    try:
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1, device=device))], fused=True)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` on `device`'s type; no autocast for None (fp32)."""
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
