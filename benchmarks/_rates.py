"""The machine's large-matmul rates for the benchmark (the FLOP formula is incr_cli/flops.py)."""

from __future__ import annotations

from incr_cli.runtime.flops import matmul_rate


def machine_rates(*, device: str, quick: bool, native_bf16: bool) -> dict[str, dict[str, float]]:
    """Large-matmul FLOP/s at fp32 and bf16 on ``device``.

    CPU: 2048^3 best of 5 (256^3 with ``quick``). Without bf16 matrix instructions a 2048 bf16 matmul
    takes about a minute, so bf16 is measured at 256 and flagged ``emulated``. CUDA: 8192^3 bf16,
    10 back to back, best of 5; fp32 is not measured there (the GPU benchmark runs bf16 only).
    """
    if device.startswith("cuda"):
        return {"bf16": {**matmul_rate("bf16", 8192, repeats=5, device=device, inner=10), "emulated": False}}
    size = 256 if quick else 2048
    repeats = 2 if quick else 5
    rates = {"fp32": {**matmul_rate("fp32", size, repeats), "emulated": False}}
    bf16_size = size if native_bf16 else 256
    rates["bf16"] = {**matmul_rate("bf16", bf16_size, repeats), "emulated": not native_bf16}
    return rates


def best_rates(*runs: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per precision, the fastest of several measurements (before and after the configurations)."""
    out: dict[str, dict[str, float]] = {}
    for rates in runs:
        for prec, r in rates.items():
            if prec not in out or r["flops_per_s"] > out[prec]["flops_per_s"]:
                out[prec] = r
    return out
