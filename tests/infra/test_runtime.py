"""infra/runtime: the one resolver of --device and --precision. Each command's allowed set and auto
rule, the messages, and which devices multiply bf16 natively: CUDA and the CPU's capability are
monkeypatched, so nothing here depends on the machine the tests run on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ser_cache.infra import runtime
from ser_cache.infra.runtime import (
    AUTO_CUDA_BF16,
    AUTO_CUDA_HALF,
    AUTO_NATIVE_BF16,
    ENCODER_PRECISIONS,
    HEADS_PRECISIONS,
    TRANSCRIBE_PRECISIONS,
    DeviceError,
    resolve_precision,
)

HEADS = {"allowed": HEADS_PRECISIONS, "auto": AUTO_NATIVE_BF16, "check_cuda_bf16": True}
ENCODERS = {"allowed": ENCODER_PRECISIONS, "auto": AUTO_CUDA_HALF}
TRANSCRIBE = {"allowed": TRANSCRIBE_PRECISIONS, "auto": AUTO_CUDA_BF16}


@pytest.fixture
def cuda(monkeypatch):
    """A machine with CUDA; `cuda(bf16=False)` makes its GPU one without bfloat16."""

    def machine(bf16: bool = True, available: bool = True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)

    return machine


@pytest.fixture
def cpu(monkeypatch):
    """A CPU with torch's capability `capability` and /proc/cpuinfo words `flags`."""

    def machine(capability: str = "AVX2", flags: tuple[str, ...] = ()):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(runtime, "cpu_flags", lambda: {"fpu", "sse2", *flags})

    return machine


# --------------------------------------------------------------------------- allowed sets


def test_each_command_takes_its_own_set_with_the_same_message():
    assert HEADS_PRECISIONS == TRANSCRIBE_PRECISIONS == ("auto", "fp32", "bf16")
    assert ENCODER_PRECISIONS == ("auto", "fp32", "bf16", "fp16")
    for rule, expected in ((HEADS, "auto, fp32, bf16"), (TRANSCRIBE, "auto, fp32, bf16"),
                           (ENCODERS, "auto, fp32, bf16, fp16")):
        with pytest.raises(DeviceError) as e:
            resolve_precision("int8", "cpu", **rule)
        assert str(e.value) == f"--precision int8: expected one of {expected}"
    assert "--precision fp16" in str(pytest.raises(DeviceError, resolve_precision, "fp16", "cpu", **HEADS).value)
    assert resolve_precision("fp16", "cpu", **ENCODERS) == "fp16"
    assert runtime.precision_problem("fp32", HEADS_PRECISIONS) is None


def test_explicit_precisions_are_kept_and_map_to_autocast_dtypes():
    for rule in (HEADS, ENCODERS, TRANSCRIBE):
        assert resolve_precision("fp32", "cpu", **rule) == "fp32"
        assert resolve_precision("bf16", "cpu", **rule) == "bf16"  # emulated on most CPUs, but asked for
    assert runtime.precision_dtype("fp32") is None
    assert runtime.precision_dtype("bf16") == torch.bfloat16
    assert runtime.precision_dtype("fp16") == torch.float16


# --------------------------------------------------------------------------- auto, command by command


def test_heads_auto_is_bf16_only_where_the_device_multiplies_it_natively(cpu, cuda):
    cpu("AVX512", ())
    assert resolve_precision("auto", "cpu", **HEADS) == "fp32"
    assert runtime.compute_dtype("auto", "cpu") is None
    cpu("AVX512", ("avx512_bf16",))
    assert resolve_precision("auto", "cpu", **HEADS) == "bf16"
    assert runtime.compute_dtype("auto", torch.device("cpu")) == torch.bfloat16
    cuda(bf16=True)
    assert resolve_precision("auto", "cuda", **HEADS) == "bf16"
    cuda(bf16=False)
    assert resolve_precision("auto", "cuda:0", **HEADS) == "fp32"


def test_heads_refuse_bf16_on_a_gpu_without_it_the_encoders_leave_it_to_torch(cuda):
    cuda(bf16=False)
    with pytest.raises(DeviceError) as e:
        runtime.compute_dtype("bf16", "cuda:1")
    assert str(e.value) == "--precision bf16: cuda:1 does not support bfloat16; use --precision fp32"
    assert resolve_precision("bf16", "cuda:1", **ENCODERS) == "bf16"
    assert resolve_precision("bf16", "cuda:1", **TRANSCRIBE) == "bf16"


def test_encoders_auto_is_half_precision_on_cuda_and_fp32_on_a_cpu(cpu, cuda):
    cpu("AMX")  # a native bf16 CPU changes nothing for the encoders
    assert resolve_precision("auto", "cpu", **ENCODERS) == "fp32"
    cuda(bf16=True)
    assert resolve_precision("auto", torch.device("cuda"), **ENCODERS) == "bf16"
    cuda(bf16=False)
    assert resolve_precision("auto", torch.device("cuda"), **ENCODERS) == "fp16"


def test_transcribe_auto_is_bf16_on_cuda_and_fp32_on_a_cpu(cpu, cuda):
    cpu("AMX")
    assert resolve_precision("auto", "cpu", **TRANSCRIBE) == "fp32"
    cuda(bf16=False)  # transcribe's rule does not ask
    assert resolve_precision("auto", "cuda", **TRANSCRIBE) == "bf16"


def test_an_unknown_auto_rule_is_a_programming_error():
    with pytest.raises(ValueError, match="auto rule 'fast'"):
        resolve_precision("auto", "cpu", allowed=HEADS_PRECISIONS, auto="fast")


# --------------------------------------------------------------------------- native bf16


@pytest.mark.parametrize("capability,flags,native", [
    ("DEFAULT", (), False),
    ("AVX2", (), False),
    ("AVX512", ("avx512f", "avx512bw"), False),  # AVX512 alone says nothing about bf16
    ("AVX512", ("avx512_bf16",), True),
    ("AVX512", ("amx_bf16", "amx_tile"), True),
    ("AMX", (), True),
    ("avx512_bf16", (), True),  # whatever the case torch spells it in
])
def test_which_cpus_multiply_bf16_natively(cpu, capability, flags, native):
    cpu(capability, flags)
    assert runtime.bf16_fast("cpu") is native
    assert runtime.bf16_fast(torch.device("cpu")) is native


def test_cpu_flags_come_from_cpuinfo_and_are_empty_without_it(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu sse2 "
                    "avx512_bf16\n")
    monkeypatch.setattr(runtime, "CPUINFO", info)
    assert {"fpu", "sse2", "avx512_bf16"} <= runtime.cpu_flags()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert runtime.bf16_fast("cpu") is True
    monkeypatch.setattr(runtime, "CPUINFO", tmp_path / "missing")
    assert runtime.cpu_flags() == set()
    assert runtime.bf16_fast("cpu") is False


def test_gpus_are_native_where_cuda_has_bf16_and_other_devices_never(cuda):
    cuda(bf16=True)
    assert runtime.bf16_fast("cuda") is True
    cuda(bf16=False)
    assert runtime.bf16_fast("cuda:0") is False
    cuda(bf16=True, available=False)
    assert runtime.bf16_fast("cuda") is False
    assert runtime.bf16_fast("meta") is False


# --------------------------------------------------------------------------- the device


def test_auto_is_the_gpu_where_there_is_one(cuda):
    cuda(available=True)
    assert runtime.resolve_device("auto") == torch.device("cuda")
    assert runtime.resolve_device("auto", check=False) == torch.device("cuda")
    cuda(available=False)
    assert runtime.resolve_device("auto") == torch.device("cpu")
    assert runtime.resolve_device("cpu") == torch.device("cpu")


def test_a_device_this_machine_cannot_give_is_refused_unless_left_to_torch(cuda):
    cuda(available=False)
    with pytest.raises(DeviceError) as e:
        runtime.resolve_device("cuda:1")
    assert str(e.value) == "--device cuda:1: CUDA is not available here; use --device cpu"
    with pytest.raises(DeviceError) as e:
        runtime.resolve_device("gpu")
    assert str(e.value) == "--device gpu: expected auto, cpu, cuda or cuda:N"
    assert runtime.resolve_device("cuda:1", check=False) == torch.device("cuda", 1)  # torch fails where it moves
    with pytest.raises(RuntimeError):
        runtime.resolve_device("gpu", check=False)


def test_each_rank_takes_its_own_gpu_under_torchrun(cuda):
    from ser_cache.infra.distributed import Dist

    cuda(available=True)
    assert runtime.rank_device("auto", 3) == runtime.rank_device("cuda", 3) == "cuda:3"
    assert runtime.rank_device("cuda:0", 3) == "cuda:0" and runtime.rank_device("cpu", 3) == "cpu"
    assert Dist(rank=1, world=2, local_rank=1).device("auto") == "cuda:1"
    assert Dist().device("auto") == "auto"  # a plain run resolves auto itself
    cuda(available=False)
    assert runtime.rank_device("auto", 3) == "auto"
    assert Dist(rank=1, world=2, local_rank=1).device("cuda") == "cuda"


# --------------------------------------------------------------------------- each caller's error


def test_each_caller_keeps_its_error_class():
    from ser_cache.encoders.base import EncoderError, RuntimeOptions
    from ser_cache.features.transcribe import TranscribeConfig, TranscribeError

    with pytest.raises(EncoderError) as e:
        RuntimeOptions(precision="int8").autocast_dtype(torch.device("cpu"))
    assert str(e.value) == "--precision int8: expected one of auto, fp32, bf16, fp16"
    assert RuntimeOptions(precision="fp16").autocast_dtype(torch.device("cpu")) == torch.float16
    assert RuntimeOptions(device="cpu").torch_device() == torch.device("cpu")
    with pytest.raises(DeviceError):
        runtime.compute_dtype("fp16", "cpu")
    with pytest.raises(TranscribeError, match="--precision fp16: expected one of auto, fp32, bf16"):
        TranscribeConfig(out=Path("out.csv"), files=(Path("a.wav"),), precision="fp16").verify()
