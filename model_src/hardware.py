"""Which arithmetic to use on this machine: bf16 only where the hardware computes it natively.

Elsewhere (AVX2-only CPUs, AVX-512 without BF16 as on ml.m5, GPUs before Ampere) bf16 is
emulated, at several times the cost of fp32; training and serving both follow this rule.
"""

from __future__ import annotations

import os
import platform

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # what autocast computes in
# oneDNN ISA limits (ONEDNN_MAX_CPU_ISA) under which bf16 is still computed natively.
_NATIVE_BF16_ISA_MARKERS = ("BF16", "AMX", "AVX512_CORE_FP16", "AVX10", "ALL", "DEFAULT")


def cpu_bf16_support() -> tuple[bool, str]:
    """(native, why): whether this CPU computes bf16 natively (AVX-512 BF16 or AMX on x86,
    the BF16 extension on Arm), as torch and its oneDNN report it. Elsewhere oneDNN emulates
    bf16 with fp32 arithmetic plus conversions, several times slower than fp32 itself."""
    capability = torch.backends.cpu.get_cpu_capability()
    onednn_bf16 = torch.backends.mkldnn.is_available() and \
        torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if platform.system() == "Darwin":  # Apple's BF16 extension: not measured yet, so no bf16
        return False, "cpu: macOS, bf16 not measured there (fp32)"
    if platform.machine().lower() in ("aarch64", "arm64"):
        return (True, "cpu: Arm BF16 extension") if onednn_bf16 else \
            (False, f"cpu: no native bf16 ({capability}, no BF16 extension)")
    limit = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "")
    if limit and not any(marker in limit.upper() for marker in _NATIVE_BF16_ISA_MARKERS):
        return False, f"cpu: no native bf16 (oneDNN limited to {limit} by ONEDNN_MAX_CPU_ISA)"
    cpu = torch.cpu
    amx = getattr(cpu, "_is_amx_tile_supported", lambda: False)()
    avx512_bf16 = getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
    if onednn_bf16 and (amx or avx512_bf16):
        return True, "cpu: native bf16 (" + ("AMX" if amx else "AVX512-BF16") + ")"
    without = " without BF16" if "AVX512" in capability else ""
    return False, f"cpu: no native bf16 ({capability}{without})"


def choose_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """(precision, why) for ``--precision``: ``auto`` takes bf16 only where it is native (a
    CUDA device with bf16, or a CPU with AVX-512 BF16 / AMX), fp32 everywhere else."""
    if requested == "fp16" and device.type == "cpu":
        return requested, "--precision fp16 (a CPU emulates fp16: some 20 times slower than fp32)"
    if requested != "auto":
        return requested, f"--precision {requested}"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16", f"cuda: {name} has native bf16"
        return "fp32", f"cuda: {name} has no native bf16"
    native, why = cpu_bf16_support()
    return ("bf16" if native else "fp32"), why

