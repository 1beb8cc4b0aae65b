"""Device and dtype policy in one place (nanoGPT `train.py`, torchtune `training/precision.py`).

Weights and optimizer state stay fp32; `bf16`/`fp16` mean autocast regions for the forward pass.
bf16 works on CPU and CUDA: on a CPU with native bf16 dot products (AVX512-BF16, AMX) its matmuls ran
~2.2x faster than fp32, on one without (AVX2 only: most AMD and older Intel CPUs) ~20x slower (a linear's
forward + backward, 512 x 576 x 1536: 667 vs 30 ms), so `auto` (the shipped recipes' setting) is bf16 where
the hardware has it and fp32 elsewhere, and an explicit bf16 on such a CPU prints a note. fp16 needs a
GradScaler (its range is too small for raw gradients) and is CUDA-only. Unsupported combinations are
rejected before any work starts.
"""

from __future__ import annotations

import contextlib
import platform
import sys
import time
from dataclasses import dataclass
from functools import lru_cache

import torch

from lmlab.errors import ConfigError

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# dense matmul peaks (FLOP/s) of common accelerators, for MFU; CPU peaks are measured instead
_GPU_PEAKS = {"H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
              "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
              "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}}


def resolve_device(name: str | torch.device = "auto", key: str = "precision.device") -> torch.device:
    """auto -> cuda when available, else cpu. Asking for a device this machine lacks is an error naming
    `key` (the recipe key or flag the name came from)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{key}={name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{key}={name!r}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}={name!r}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"{key}={name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


@dataclass
class Precision:
    """Resolved device + autocast dtype, with the gradient scaler when fp16 needs one."""

    device: torch.device
    dtype_name: str = "fp32"

    def __post_init__(self) -> None:
        if self.dtype_name == "auto":
            self.dtype_name = auto_dtype_name(self.device)
        if self.dtype_name not in DTYPES:
            raise ConfigError(f"precision.dtype={self.dtype_name!r}: expected auto or one of {sorted(DTYPES)}")
        if self.dtype_name == "bf16" and self.device.type == "cpu" and not cpu_has_bf16():
            _note_slow_bf16()
        if self.dtype_name == "fp16" and self.device.type != "cuda":
            raise ConfigError("precision.dtype=fp16 needs CUDA (GradScaler); use bf16 on CPU")
        if self.dtype_name == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("precision.dtype=bf16: this GPU has no bf16 support; use fp16")
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype_name == "fp16" else None

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward-pass context: autocast for bf16/fp16, nothing for fp32."""
        if self.dtype_name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def peak_flops(device: torch.device, dtype_name: str) -> float:
    """Matmul peak (FLOP/s) for MFU: a table for known GPUs, a short measurement otherwise."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in _GPU_PEAKS.items():
            if key in name:
                return peaks[dtype_name]
    return measure_matmul_peak(device.type, dtype_name)


@lru_cache(maxsize=None)
def measure_matmul_peak(device_type: str = "cpu", dtype_name: str = "fp32", n: int = 1024, seconds: float = 0.3) -> float:
    """Best observed FLOP/s of an n x n matmul in `dtype` (the machine's practical peak)."""
    dtype = DTYPES[dtype_name]
    g = torch.Generator(device=device_type).manual_seed(0)  # never the global RNG: a run's dropout masks
    a = torch.randn(n, n, device=device_type, generator=g).to(dtype)  # must not depend on whether the
    b = torch.randn(n, n, device=device_type, generator=g).to(dtype)  # (cached) peak was measured before
    best, deadline = 0.0, time.perf_counter() + seconds
    for i in range(1000):
        if device_type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        if device_type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
        if i >= 3 and time.perf_counter() > deadline:
            break
    return best


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak resident memory on CPU (since the last
    `reset_peak_memory`, where Linux allows resetting it)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:  # VmHWM: the resident high-water mark, resettable
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak window (one pipeline stage after another in one process): the CUDA allocator's
    peak, or on Linux the process's resident high-water mark (/proc/self/clear_refs, value 5)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not allowed: the peak stays the process's
        pass


@lru_cache(maxsize=None)
def cpu_has_bf16() -> bool:
    """Native bf16 dot products (AVX512-BF16 or AMX): then bf16 is the fast choice for matmuls."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_name() -> str:
    """The CPU's model name, for benchmark tables (results differ most between CPU kinds: an AMX Xeon and
    an AVX512-BF16 EPYC rank the same kernels differently), else the architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The accelerator's name on CUDA, else the CPU's (`cpu_name`): the device line of benchmark tables."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def auto_dtype_name(device: torch.device) -> str:
    """precision.dtype=auto: bf16 autocast where the hardware does bf16 matmuls natively, else fp32."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


@lru_cache(maxsize=None)
def _note_slow_bf16() -> None:
    print("note: precision.dtype=bf16 on a CPU without native bf16 (no AVX512-BF16 / AMX): its matmuls run "
          "~20x slower than fp32 here; precision.dtype=auto picks fp32 on this machine", file=sys.stderr)


def inference_dtype(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    """Weights dtype for inference: `auto` = bf16 where the hardware does bf16 natively, else fp32."""
    if name != "auto":
        if name not in DTYPES:
            raise ConfigError(f"dtype={name!r}: expected auto or one of {sorted(DTYPES)}")
        return DTYPES[name]
    device = resolve_device(device, "device")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16  # no scaler needed here
    return DTYPES[auto_dtype_name(device)]
