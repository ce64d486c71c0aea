"""Device, precision and thread choices shared by training, eval and the benchmark."""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache

import torch

from incr_cli.errors import UsageError, shown


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cpu``, ``cuda``, ``cuda:N`` as given (checked)."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"runtime.device: {shown(spec)} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"runtime.device: {shown(spec)} asked for, but no CUDA device is available; use runtime.device=cpu")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"runtime.device: {shown(spec)} is not supported; use auto, cpu, cuda or cuda:N")
    return device


BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpuinfo_has_bf16(cpuinfo: str) -> bool:
    """True when the first ``flags`` line of /proc/cpuinfo text lists AMX-BF16 or AVX512-BF16.
    Whole flags only (``avx512_bf16``, not a prefix of another); other lines (``vmx flags``,
    ``bugs``) are not read."""
    line = next((line for line in cpuinfo.splitlines() if line.split(":", 1)[0].strip() == "flags"), "")
    flags = line.partition(":")[2].split()
    return any(flag in flags for flag in BF16_CPU_FLAGS)


@cache
def cpu_has_bf16_matmul(cpuinfo_path: str = "/proc/cpuinfo") -> bool:
    """True when the CPU has bf16 matrix instructions (AMX or AVX512-BF16), where bf16 autocast pays."""
    if sys.platform != "linux":
        return False
    try:
        with open(cpuinfo_path, encoding="utf-8", errors="replace") as f:
            return cpuinfo_has_bf16(f.read())
    except OSError:
        return False


def choose_precision(spec: str, device: torch.device) -> tuple[str, str]:
    """-> (precision, why): ``auto`` -> "bf16" on CUDA with bf16 support and on CPUs with bf16
    matrix instructions (AMX or AVX512-BF16), else "fp32"; explicit "bf16"/"fp32" are kept.

    bf16 means autocast for the forward passes; master weights, optimizer state, the losses (MLM
    cross-entropy, the distillation KL) and their log-softmax stay fp32. On a CPU without bf16
    units bf16 matmuls are emulated and far slower than fp32, so auto never picks it there.
    """
    if spec != "auto":
        return spec, f"runtime.precision={spec} was asked for"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: this CUDA device supports bf16"
        return "fp32", "auto: this CUDA device has no bf16 support"
    if cpu_has_bf16_matmul():
        return "bf16", ("auto: this CPU has bf16 matrix instructions (AMX / AVX512-BF16), where bf16 autocast "
                        "trains faster and ends within 2% of fp32's held-out perplexity (docs/performance.md)")
    return "fp32", "auto: this CPU has no bf16 matrix instructions (AMX / AVX512-BF16); bf16 would be emulated"


@dataclass(frozen=True)
class Placement:
    """Where a model runs and at which precision ("bf16": autocast forwards; "fp32"): one value,
    resolved once per command and handed to every training, scoring and embedding call."""

    device: torch.device
    precision: str = "fp32"
    why: str = field(default="", compare=False)  # why this precision (``choose_precision``), for the record

    @classmethod
    def resolve(cls, device: str | torch.device = "auto", precision: str = "auto") -> Placement:
        """``runtime.device`` and ``runtime.precision`` specs -> the placement (see resolve_device,
        choose_precision); a ``torch.device`` is taken as it is."""
        dev = device if isinstance(device, torch.device) else resolve_device(device)
        return cls(dev, *choose_precision(precision, dev))

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.precision)


CPU = Placement(torch.device("cpu"))


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context for a forward pass at ``precision`` (a no-op for fp32)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def configure_threads(num_threads: int | None) -> int:
    """Use every core once: one intra-op thread per core, inter-op 1 (no oversubscription)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = num_threads or cores
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # only settable before the first parallel op
        torch.set_num_interop_threads(1)
    return n


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this run: max allocated on CUDA, peak RSS of the process on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@contextlib.contextmanager
def inference(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode + inference_mode for the duration, restoring the training flag afterwards."""
    was_training = module.training
    module.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        module.train(was_training)
