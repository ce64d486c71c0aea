"""Model FLOPs of one training step, the hardware's large-matmul rate, and known GPU peaks.

What is counted (matrix multiplications only; softmax, layer norm, GELU, losses and the optimizer
are left out, as is usual for MFU), for what each configuration actually computes:

- N = parameters of the encoder layers (attention q/k/v/o, feed-forward, their biases and layer
  norms), N_l = N / L per layer. Embeddings are lookups and cost no FLOPs; their gradient is a scatter.
- Student (trained): 6 * N * tokens (2 forward + 4 backward FLOPs per parameter and token)
  + attention 3 * L * 4 * B * T^2 * H (QK^T and AV are 2*B*T^2*H each forward; backward is twice
  the forward) + head 6 * (H*H + H*V) * P, where P is the number of positions the vocabulary head
  runs at: every position for Hugging Face's BertForMaskedLM, the masked ones for incr.
- incr also runs its last encoder layer at the P masked rows only (keys and values for every
  token): that layer counts 6 * 2*(H^2+H) * tokens + 6 * (N_l - 2*(H^2+H)) * P and attention
  3 * 4 * P * T * H instead of 6 * N_l * tokens and 3 * 4 * B * T^2 * H.
- Teacher (frozen, forward only): the same with 2 in place of 6 and 1 in place of 3.

tokens = B * T (packed rows, no padding).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

FORMULA = ("student = 6*N*tokens + 3*L*4*B*T^2*H + 6*(H^2+H*V)*P_head;  teacher = 2*N*tokens + L*4*B*T^2*H "
           "+ 2*(H^2+H*V)*P;  N = encoder-layer parameters (no embeddings), P_head = B*T for HF, P = masked "
           "positions for incr, whose last layer counts k,v at every token and the rest of it at the P rows "
           "(6*2(H^2+H)*tokens + 6*(N/L - 2(H^2+H))*P + 3*4*P*T*H for the student)")

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, from the vendors' data sheets.
GPU_PEAK_BF16 = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
    ("L4", 121e12),
]


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> ModelShape:
        return cls(config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                   config.intermediate_size, config.vocab_size)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def encoder_params(s: ModelShape) -> int:
    """Parameters of the encoder layers: q, k, v, o (+biases), two feed-forward matrices (+biases), two LNs."""
    h, i = s.hidden, s.intermediate
    attention = 4 * (h * h + h)
    feed_forward = h * i + i + i * h + h
    norms = 2 * 2 * h
    return s.layers * (attention + feed_forward + norms)


def head_params(s: ModelShape) -> int:
    """Matmul parameters of the MLM head per position: transform H x H and decoder H x V."""
    return s.hidden * s.hidden + s.hidden * s.vocab


def attention_flops_forward(s: ModelShape, batch: int, seq: int) -> int:
    """QK^T and AV over all layers: L * 4 * B * T^2 * H."""
    return s.layers * 4 * batch * seq * seq * s.hidden


def _encoder_flops(s: ModelShape, batch: int, seq: int, factor: int, last_rows: float | None) -> float:
    """Encoder matmul FLOPs at ``factor`` per parameter and token (6 trained, 2 forward only);
    ``last_rows``: rows the last layer runs at (keys and values still at every token), None = all."""
    tokens = batch * seq
    per_layer = encoder_params(s) / s.layers
    attention_per_layer = 4 * batch * seq * seq * s.hidden
    full = factor * per_layer * tokens + factor // 2 * attention_per_layer
    if last_rows is None:
        return s.layers * full
    kv = 2 * (s.hidden * s.hidden + s.hidden)
    last = factor * kv * tokens + factor * (per_layer - kv) * last_rows + factor // 2 * 4 * last_rows * seq * s.hidden
    return (s.layers - 1) * full + last


def step_flops(s: ModelShape, batch: int, seq: int, *, head_positions: float,
               teacher_positions: float | None = None, last_layer_rows: float | None = None) -> dict[str, float]:
    """FLOPs of one optimizer step -> {"student", "teacher", "total"} (see the module docstring).

    head_positions: positions the student's vocabulary head runs at (B*T for HF, masked for incr);
    teacher_positions: masked positions of the teacher's forward, None when there is no teacher;
    last_layer_rows: rows the student's last layer runs at (the teacher's: its positions), None = all.
    """
    student = _encoder_flops(s, batch, seq, 6, last_layer_rows) + 6 * head_params(s) * head_positions
    teacher = 0.0
    if teacher_positions is not None:
        rows = teacher_positions if last_layer_rows is not None else None
        teacher = _encoder_flops(s, batch, seq, 2, rows) + 2 * head_params(s) * teacher_positions
    return {"student": float(student), "teacher": float(teacher), "total": float(student + teacher)}


def known_gpu_peak(name: str) -> float | None:
    """Dense bf16 peak FLOP/s for a CUDA device name, None when not in the table."""
    for key, peak in GPU_PEAK_BF16:
        if key.lower() in name.lower():
            return peak
    return None


def matmul_rate(dtype_name: str, size: int, repeats: int = 5, device: str = "cpu", inner: int = 1) -> dict[str, float]:
    """Best FLOP/s over ``repeats`` timings of ``inner`` back-to-back ``size`` x ``size`` matmuls at
    ``dtype_name`` ("fp32" or "bf16") -> {flops_per_s, size, seconds (of one matmul)}."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b  # warm-up: kernel choice, page faults
    sync()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(inner):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - started) / inner)
    return {"flops_per_s": 2 * size**3 / best, "size": size, "seconds": best}


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
