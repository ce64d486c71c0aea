"""Model FLOPs of one training step, the hardware's large-matmul rate, known GPU peaks, and the
model FLOP utilisation (MFU) of training windows. Used by training's log lines and by the benchmark.

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

MFU = model FLOPs per second / the device's peak: the data-sheet dense bf16 peak for known GPUs
(training at bf16), on CPU the large-matmul rate measured once per process at the run's precision,
else unknown (None).
"""

from __future__ import annotations

import functools
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


# ----------------------------------------------------------------------------- training's MFU

CPU_MATMUL_SIZE = 1024  # 2 GFLOP per matmul: tens of milliseconds on a few cores, measured once


@dataclass(frozen=True)
class Meter:
    """What one training run computes per row and masked position, and the peak it is measured against."""

    shape: ModelShape
    teacher: float  # share of the rows a frozen teacher's forward runs on (0 or False = no teacher)
    last_layer_masked: bool  # the masked-only last layer (incr's MaskedLMHead on BERT / RoBERTa)
    head_all_positions: bool  # the vocabulary head runs at every position (a model without the split head)
    peak_flops_per_s: float | None  # per device; None = unknown
    peak_source: str
    devices: int = 1

    def flops(self, rows: float, seq: int, masked: float) -> float:
        """Model FLOPs of ``rows`` packed rows of length ``seq`` with ``masked`` masked positions (all steps)."""
        head = rows * seq if self.head_all_positions else masked
        last = masked if self.last_layer_masked else None
        total = step_flops(self.shape, rows, seq, head_positions=head, last_layer_rows=last)["total"]
        if self.teacher:  # its rows and their masked positions: the share of the batch it runs on
            share = float(self.teacher)
            total += step_flops(self.shape, rows * share, seq, head_positions=0.0, teacher_positions=head * share,
                                last_layer_rows=None if last is None else last * share)["teacher"]
        return total

    def mfu(self, rows: float, seq: int, masked: float, seconds: float) -> float | None:
        """Model FLOP/s over ``seconds`` of all devices / their peak; None when the peak is unknown."""
        if not self.peak_flops_per_s or seconds <= 0 or rows <= 0:
            return None
        return self.flops(rows, seq, masked) / seconds / (self.peak_flops_per_s * self.devices)


# The encoders whose layers are what the formula counts (BERT's layer: q, k, v, o, two feed-forward
# matrices; MLM head transform + decoder). Others differ in what they compute (gated feed-forward,
# relative-position attention, factorised embeddings): their MFU is left unknown, not guessed.
FORMULA_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert")


def model_shape(config) -> ModelShape | None:
    """The shape of a config of ``FORMULA_MODEL_TYPES``; None for any other model."""
    if getattr(config, "model_type", None) not in FORMULA_MODEL_TYPES:
        return None
    return ModelShape.from_config(config)


def device_peak(device, precision: str) -> tuple[float | None, str]:
    """-> (peak FLOP/s of one device at ``precision``, where the number comes from).

    CUDA at bf16: the data-sheet peak of a known GPU. CPU: the large-matmul rate measured now (once
    per process, precision and thread count). Anything else: (None, "unknown").
    """
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = known_gpu_peak(name) if precision == "bf16" else None
        return (peak, f"{name} data-sheet dense bf16 peak") if peak else (None, "unknown")
    if device.type == "cpu":
        return _cpu_matmul_rate(precision, torch.get_num_threads())
    return None, "unknown"


@functools.cache
def _cpu_matmul_rate(precision: str, threads: int) -> tuple[float | None, str]:
    from incr_cli.runtime.device import cpu_has_bf16_matmul

    # bf16 without matrix units is emulated and slow: a smaller matmul keeps the measurement cheap.
    size = CPU_MATMUL_SIZE if precision == "fp32" or cpu_has_bf16_matmul() else 256
    rate = matmul_rate(precision, size, repeats=3)["flops_per_s"]
    return rate, f"measured {size}^3 {precision} matmul on {threads} CPU threads"
