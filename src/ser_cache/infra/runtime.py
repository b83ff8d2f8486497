"""Where and how a computation runs: the device, the precision of its matrix products, CPU threads.

The one resolver of `--device` and `--precision` for every command: `resolve_device` (and
`rank_device` under torchrun), and `resolve_precision`, which takes the command's allowed set
(HEADS_PRECISIONS, ENCODER_PRECISIONS, TRANSCRIBE_PRECISIONS) and its rule for auto (AUTO_NATIVE_BF16,
AUTO_CUDA_HALF, AUTO_CUDA_BF16) as arguments; `bf16_fast` says which devices multiply bf16 natively.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class DeviceError(ValueError):
    """A --device or --precision that this machine cannot give, or that the command does not take."""


# --------------------------------------------------------------------------- the device

DEVICE_NAMES = "auto, cpu, cuda or cuda:N"


def resolve_device(device: str, *, check: bool = True):
    """--device as a torch.device: auto is the GPU where torch sees one, else the CPU.

    `check`: refuse (DeviceError) a name torch does not know and CUDA where there is none. The
    encoders and the transcriber pass False: they leave both to torch, where the model moves.
    """
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not check:
        return torch.device(device)
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DeviceError(f"--device {device}: expected {DEVICE_NAMES}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {device}: CUDA is not available here; use --device cpu")
    return dev


def rank_device(device: str, local_rank: int) -> str:
    """--device of one rank under torchrun: its own GPU (cuda:LOCAL_RANK) when the device is auto or
    plain cuda and there is CUDA; otherwise the device as given."""
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank}"
    return device


# --------------------------------------------------------------------------- the precision

# Each command's --precision choices; cli/shared_options.py declares the same (tests/test_trust_cli.py).
HEADS_PRECISIONS = ("auto", "fp32", "bf16")  # the heads' matrix products; weights, loss and metrics stay fp32
ENCODER_PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # the encoders' autocast (extract, bench, finetune wavlm)
TRANSCRIBE_PRECISIONS = ("auto", "fp32", "bf16")  # Whisper's generate in transcribe

# What --precision auto becomes: each command's rule, the `auto` argument of resolve_precision.
AUTO_NATIVE_BF16 = "native-bf16"  # bf16 where the device multiplies bf16 natively (bf16_fast), else fp32: the heads
AUTO_CUDA_HALF = "cuda-half"  # on CUDA bf16, or fp16 where the GPU lacks bf16; fp32 on a CPU: the encoders
AUTO_CUDA_BF16 = "cuda-bf16"  # bf16 on CUDA, fp32 on a CPU: transcribe
AUTO_RULES = (AUTO_NATIVE_BF16, AUTO_CUDA_HALF, AUTO_CUDA_BF16)

CPUINFO = Path("/proc/cpuinfo")
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # flags of CPUs that multiply bf16 natively


def cpu_flags() -> set[str]:
    """The words of /proc/cpuinfo, the CPU's feature flags among them; none where there is no such file."""
    try:
        return set(CPUINFO.read_text().split())
    except OSError:
        return set()


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
    return any(flag in cpu_flags() for flag in NATIVE_BF16_FLAGS)


def auto_precision(device, rule: str) -> str:
    """What --precision auto is on `device` under `rule` (one of AUTO_RULES): fp32, bf16 or fp16."""
    import torch

    if rule not in AUTO_RULES:
        raise ValueError(f"auto rule {rule!r}: expected one of {', '.join(AUTO_RULES)}")
    if rule == AUTO_NATIVE_BF16:
        return "bf16" if bf16_fast(device) else "fp32"
    if torch.device(device).type != "cuda":
        return "fp32"
    if rule == AUTO_CUDA_HALF and not torch.cuda.is_bf16_supported():
        return "fp16"
    return "bf16"


def precision_problem(precision: str, allowed: tuple[str, ...]) -> str | None:
    """The message for a --precision the command does not take; None for one it does."""
    if precision in allowed:
        return None
    return f"--precision {precision}: expected one of {', '.join(allowed)}"


def resolve_precision(precision: str, device, *, allowed: tuple[str, ...], auto: str,
                      check_cuda_bf16: bool = False) -> str:
    """--precision on `device` for a command that takes `allowed` and resolves auto by the rule
    `auto`: "fp32", "bf16" or "fp16" (`precision_dtype` gives its torch dtype).

    A precision outside `allowed` raises DeviceError. `check_cuda_bf16`: refuse bf16 on a GPU
    that does not support it (the heads); elsewhere torch's autocast has the last word.
    """
    import torch

    problem = precision_problem(precision, allowed)
    if problem:
        raise DeviceError(problem)
    name = auto_precision(device, auto) if precision == "auto" else precision
    if (check_cuda_bf16 and name == "bf16" and torch.device(device).type == "cuda"
            and not torch.cuda.is_bf16_supported()):
        raise DeviceError(f"--precision bf16: {device} does not support bfloat16; use --precision fp32")
    return name


def precision_dtype(name: str):
    """The autocast dtype of a resolved precision: torch.bfloat16, torch.float16, or None for fp32."""
    import torch

    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def compute_dtype(precision: str, device):
    """The dtype of the heads' matrix products for --precision on `device`: torch.bfloat16, or None for fp32."""
    return precision_dtype(resolve_precision(precision, device, allowed=HEADS_PRECISIONS, auto=AUTO_NATIVE_BF16,
                                             check_cuda_bf16=True))


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
