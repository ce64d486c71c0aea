"""One benchmark configuration in a process of its own (so its peak memory is its own).

    python benchmarks/_worker.py SPEC_JSON

The parent (bench_train.py) drives it over stdin/stdout, one JSON line each way, so that the
configurations take turns on the CPU: the worker loads everything and says "loaded", then runs one
phase per command ("warmup", "window" x repeats, maybe "profile") and reports each, then "exit".
Lines the worker writes for the parent start with ``@@bench``; anything else (library chatter) is
ignored. Step timing is wall clock from one step's end to the next, so data loading and masking
count; on CUDA the device is synchronised only at phase boundaries.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

PREFIX = "@@bench "
_OUT = sys.stdout  # protocol channel; libraries' prints go to stderr (see main)


def emit(kind: str, **payload: Any) -> None:
    _OUT.write(PREFIX + json.dumps({"kind": kind, **payload}) + "\n")
    _OUT.flush()


def read_command() -> str:
    line = sys.stdin.readline()
    if not line:
        raise SystemExit("bench worker: the parent closed the pipe")
    return line.strip()


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class Driver:
    """Counts steps and, at phase boundaries, reports and waits for the parent's next command.

    Phases: warmup (``warmup`` steps), ``repeats`` windows of ``steps`` steps, then ``profile_steps``
    steps under torch.profiler when asked. ``total_steps`` is what the training loop must run.
    """

    def __init__(self, spec: dict[str, Any], device: torch.device):
        self.device = device
        self.phases = [("warmup", spec["warmup"])] + [("window", spec["steps"])] * spec["repeats"]
        if spec.get("profile_steps"):
            self.phases.append(("profile", spec["profile_steps"]))
        self.total_steps = sum(n for _, n in self.phases)
        self.phase = -1
        self.left = 0
        self.started = self.cpu_started = 0.0
        self.ends: list[float] = []
        self.compute: list[float] = []
        self.step_started: float | None = None
        self.profiler: torch.profiler.profile | None = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self, **info: Any) -> None:
        """Everything is built: say so and wait for the first command."""
        emit("loaded", **info)
        self._next_phase()

    def _next_phase(self) -> None:
        self.phase += 1
        command = read_command()
        if self.phase >= len(self.phases):
            if command != "exit":
                raise SystemExit(f"bench worker: expected exit, got {command!r}")
            return
        name, self.left = self.phases[self.phase]
        if command != name:
            raise SystemExit(f"bench worker: expected {name!r}, got {command!r}")
        if name == "profile":
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
        self._sync()
        self.ends, self.compute = [], []
        self.cpu_started = time.process_time()
        self.started = time.perf_counter()

    def step_begin(self) -> None:
        self.step_started = time.perf_counter()

    def step_end(self) -> None:
        now = time.perf_counter()
        if self.step_started is not None:
            self.compute.append(now - self.step_started)
            self.step_started = None
        self.ends.append(now)
        self.left -= 1
        if self.left == 0:
            self._finish_phase()

    def _finish_phase(self) -> None:
        self._sync()
        seconds = time.perf_counter() - self.started
        cpu_seconds = time.process_time() - self.cpu_started
        name = self.phases[self.phase][0]
        marks = [self.started, *self.ends]
        result: dict[str, Any] = {"phase": name, "steps": len(self.ends), "seconds": seconds, "cpu_seconds": cpu_seconds,
                                  "step_seconds": [b - a for a, b in zip(marks, marks[1:])]}
        if self.compute:
            result["compute_seconds"] = self.compute
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            result["profile"] = profile_summary(self.profiler, self.device, len(self.ends))
            self.profiler = None
        emit("phase", **result)
        self._next_phase()


def profile_summary(prof: torch.profiler.profile, device: torch.device, steps: int, top: int = 15) -> dict[str, Any]:
    """Top operators by self time (per step, ms) and the printed table."""
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    total = sum(getattr(e, key) for e in averages) or 1.0
    rows = sorted(averages, key=lambda e: getattr(e, key), reverse=True)[:top]
    ops = [{"op": e.key, "ms_per_step": getattr(e, key) / 1e3 / steps, "share": getattr(e, key) / total,
            "calls_per_step": e.count / steps} for e in rows]
    return {"sort": key, "ops": ops, "total_ms_per_step": total / 1e3 / steps}


def build_model(spec: dict[str, Any]) -> Any:
    """BertForMaskedLM with SDPA attention: the given shape, weights from ``spec["weights"]`` when set."""
    from transformers import BertConfig, BertForMaskedLM

    from incr_cli.model.weights import quiet_transformers

    shape = spec["model"]
    if spec.get("weights"):
        with quiet_transformers():  # the package is a BertModel: the MLM head is freshly initialised
            model = BertForMaskedLM.from_pretrained(spec["weights"], attn_implementation="sdpa")
        got = {"layers": model.config.num_hidden_layers, "hidden": model.config.hidden_size,
               "heads": model.config.num_attention_heads, "intermediate": model.config.intermediate_size,
               "vocab": model.config.vocab_size}
        if got != shape:
            raise SystemExit(f"bench worker: weights at {spec['weights']} have shape {got}, expected {shape}")
    else:
        config = BertConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                            num_attention_heads=shape["heads"], intermediate_size=shape["intermediate"],
                            max_position_embeddings=max(512, spec["seq_len"]), pad_token_id=spec["pad_id"])
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        model = BertForMaskedLM(config)
    return model.float()


def load_tokenizer(spec: dict[str, Any]) -> Any:
    from _data import load_tokenizer as load

    return load(spec["tokenizer"])


def main() -> None:
    global _OUT
    spec = json.loads(sys.argv[1])
    # Keep the protocol channel clean: whatever else is printed goes to stderr.
    _OUT = sys.stdout
    sys.stdout = sys.stderr
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if spec["config"] == "a":
        from _hf_baseline import run_hf

        run_hf(spec, device, Driver(spec, device))
    else:
        from _incr_loop import run_incr

        run_incr(spec, device, Driver(spec, device))
    emit("final", peak_memory_bytes=peak_memory(device))


if __name__ == "__main__":
    main()
