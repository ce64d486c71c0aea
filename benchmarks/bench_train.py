"""Training speed side by side: (a) Hugging Face Trainer, (b) incr plain MLM, (c) incr distill + replay.

    .venv/bin/python benchmarks/bench_train.py            # CPU: MiniLM-L6 shape, batch 16 x 128, 2 threads
    .venv/bin/python benchmarks/bench_train.py --gpu      # one CUDA GPU: BERT-base shape, seq 128 and 512, bf16
    .venv/bin/python benchmarks/bench_train.py --quick    # a tiny model, seconds (the smoke test)

Every configuration runs in a process of its own (peak memory per configuration) and all of them are
alive at once, taking turns: warm-up steps first (not timed), then ``--repeats`` rounds in which each
configuration runs one window of ``--steps`` steps, the order rotating per round. So load from
elsewhere on the machine hits every configuration alike; ratios are taken within a round, then the
median over rounds. The same model shape, packed rows of real text, batch, sequence length,
precision and thread count are used by all. The machine's large-matmul rate is measured in the same
run, and each configuration's model FLOP/s is reported against it (formula in incr_cli/flops.py, which training's
log lines use too).
Prints a table and PASS/SHORT per target, writes JSON (default bench-results/train.json, or
train-gpu.json with --gpu).

On a machine busy with other jobs, two-thread processes lose a roughly fixed time per operator
waiting for a descheduled partner thread, which weighs more on the configuration with less work per
step: there ``--threads 1`` (and the paired CPU-seconds column) is the steadier comparison.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

import _data  # noqa: E402
import _report  # noqa: E402
from _rates import best_rates, machine_rates  # noqa: E402

from incr_cli.runtime.device import cpu_has_bf16_matmul  # noqa: E402
from incr_cli.runtime.flops import FORMULA, ModelShape, known_gpu_peak, step_flops  # noqa: E402

PREFIX = "@@bench "
LABELS = {"a": "HF Trainer", "b": "incr MLM", "c": "incr KD+replay"}
MINILM = ModelShape(layers=6, hidden=384, heads=12, intermediate=1536, vocab=30522)
BERT_BASE = ModelShape(layers=12, hidden=768, heads=12, intermediate=3072, vocab=30522)
# Targets: (precision, name) -> minimum. fp32 b/a from issue 6; the rest from issue 13.
CPU_TARGETS = {"fp32": {"b/a": 2.5, "c/a": 1.8, "c_matmul_fraction": 0.65},
               "bf16": {"b/a": 5.0, "c/a": 4.0, "c_matmul_fraction": 0.45}}
# CPU flags that decide the matmul rates (named in the report and the README's table).
MATMUL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
GPU_TARGETS = {"b/a": 1.5, "c_mfu": 0.45}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="CUDA mode: BERT-base shape, seq 128 and 512, bf16, MFU")
    p.add_argument("--quick", action="store_true", help="tiny model, 2 steps, no repeats: checks the harness only")
    p.add_argument("--steps", type=int, help="timed steps per window (default 3 CPU, 30 GPU, 2 quick)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 2 CPU, 10 GPU, 1 quick)")
    p.add_argument("--repeats", type=int, help="timed windows per configuration (default 5 CPU, 3 GPU, 1 quick)")
    p.add_argument("--configs", default="a,b,c", help="comma list of a, b, c; add +compile (e.g. c+compile) "
                                                        "for incr with runtime.compile=true")
    p.add_argument("--precision", default="auto", help="comma list of fp32, bf16; auto = fp32, plus bf16 where "
                                                       "the CPU has bf16 matrix instructions (bf16 only on GPU)")
    p.add_argument("--seq", help="sequence length(s), comma list (default 128 CPU, 128,512 GPU)")
    p.add_argument("--batch", type=int, help="sequences per step (default 16 CPU; GPU 16384 tokens / seq)")
    p.add_argument("--threads", type=int, help="torch intra-op threads in every process (default 2 CPU)")
    p.add_argument("--profile", type=int, default=None, help="profile this many steps per configuration "
                                                             "after the windows (default 1 CPU, 3 GPU, 0 quick)")
    p.add_argument("--scaling", action=argparse.BooleanOptionalAction, default=None,
                   help="also time an increment with 1, 5 and 20 earlier increments and eval per version "
                        "row (tiny model; default on, off with --quick and --gpu)")
    p.add_argument("--out", type=Path, help="JSON output (default bench-results/train.json or train-gpu.json)")
    args = p.parse_args(argv)
    gpu, quick = args.gpu, args.quick
    args.steps = args.steps or (2 if quick else 30 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 10 if gpu else 2)
    args.repeats = args.repeats or (1 if quick else 3 if gpu else 5)
    args.profile = args.profile if args.profile is not None else (0 if quick else 3 if gpu else 1)
    args.scaling = args.scaling if args.scaling is not None else not (quick or gpu)
    args.seqs = [int(s) for s in (args.seq or ("128,512" if gpu else "32" if quick else "128")).split(",")]
    args.threads = args.threads or (min(8, os.cpu_count() or 1) if gpu else 2)
    args.config_list = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in args.config_list:
        if c.split("+")[0] not in LABELS or c.split("+")[1:] not in ([], ["compile"]) or c.startswith("a+"):
            p.error(f"--configs: {c!r} is not one of a, b, c, b+compile, c+compile")
    precisions = ["fp32", "bf16"] if args.precision == "auto" else args.precision.split(",")
    if args.gpu and args.precision == "auto":
        precisions = ["bf16"]
    for prec in precisions:
        if prec not in ("fp32", "bf16"):
            p.error(f"--precision: {prec!r} is not fp32 or bf16")
    args.precisions = precisions
    args.auto_precision = args.precision == "auto"
    args.out = args.out or REPO / "bench-results" / ("train-gpu.json" if gpu else "train.json")
    return args


def batch_for(args: argparse.Namespace, seq: int) -> int:
    if args.batch:
        return args.batch
    if args.quick:
        return 4
    return max(1, 16384 // seq) if args.gpu else 16


# ----------------------------------------------------------------------------- workers


class Worker:
    """One configuration's process; commands in on stdin, ``@@bench`` JSON lines out on stdout."""

    script = BENCH / "_worker.py"

    def __init__(self, name: str, spec: dict[str, Any], log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"{name}-{spec['precision']}-{spec['seq_len']}.log"
        self.log = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([sys.executable, str(self.script), json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     cwd=str(REPO))

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX):])
        self.proc.wait()
        tail = self.log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"benchmark worker {self.name} exited with {self.proc.returncode}:\n{tail}")

    def send(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def worker_spec(args: argparse.Namespace, config: str, precision: str, seq: int, data: dict[str, Any],
                tok: dict[str, Any]) -> dict[str, Any]:
    base, _, extra = config.partition("+")
    return {"config": base, "compile": extra == "compile", "precision": precision, "seq_len": seq,
            "batch": batch_for(args, seq), "device": "cuda" if args.gpu else "cpu", "threads": args.threads,
            "warmup": args.warmup, "steps": args.steps, "repeats": args.repeats, "profile_steps": args.profile,
            "seed": 0, "model": tok["shape"].to_dict(), "weights": tok["weights"], "tokenizer": tok["tokenizer"],
            "pad_id": tok["pad_id"], "new_rows": data["new"]["path"], "replay_rows": data["replay"]["path"]}


def run_group(args: argparse.Namespace, precision: str, seq: int, data: dict[str, Any], tok: dict[str, Any],
              log_dir: Path, say: Any) -> dict[str, Any]:
    """All configurations at one precision and sequence length, interleaved -> per-config raw results."""
    workers = {c: Worker(c, worker_spec(args, c, precision, seq, data, tok), log_dir) for c in args.config_list}
    results: dict[str, dict[str, Any]] = {c: {"windows": [], "load_avg": []} for c in workers}
    try:
        for c, w in workers.items():  # they load in parallel; nothing is timed yet
            results[c]["loaded"] = w.read()
        for c, w in workers.items():  # warm-ups one at a time: no oversubscribed cores
            say(f"  warm-up {c} ({args.warmup} steps)")
            results[c]["warmup"] = w.send("warmup")
        names = list(workers)
        for r in range(args.repeats):
            order = names[r % len(names):] + names[: r % len(names)]
            for c in order:
                results[c]["load_avg"].append(os.getloadavg()[0])
                window = workers[c].send("window")
                results[c]["windows"].append(window)
                say(f"  round {r + 1}/{args.repeats} {c}: {window['seconds'] / window['steps']:.3f} s/step")
        if args.profile:
            for c, w in workers.items():
                say(f"  profile {c} ({args.profile} steps)")
                results[c]["profile"] = w.send("profile")["profile"]
        for c, w in workers.items():
            results[c]["final"] = w.send("exit")
            w.proc.wait(timeout=120)
    finally:
        for w in workers.values():
            w.close()
    return results


# ----------------------------------------------------------------------------- summarising


def summarise_group(args: argparse.Namespace, precision: str, seq: int, raw: dict[str, Any], data: dict[str, Any],
                    shape: ModelShape, peak: float | None) -> dict[str, Any]:
    """Medians, ratios (paired per round), FLOPs and MFU of one group; matmul_fraction is filled in later."""
    from incr_cli.config.recipe import MaskingConfig

    batch = batch_for(args, seq)
    tokens = batch * seq
    p = MaskingConfig().probability
    m_new, m_replay = data["new"]["maskable_per_row"], data["replay"]["maskable_per_row"]
    configs: dict[str, Any] = {}
    for c, res in raw.items():
        base = c.split("+")[0]
        per_window = [w["seconds"] / w["steps"] for w in res["windows"]]
        sps = statistics.median(per_window)
        loaded = res["loaded"]
        if base == "a":
            head, teacher, last = float(tokens), None, None
        else:
            n_new, n_replay = loaded["n_new"], loaded["n_replay"]
            head = n_new * max(1.0, p * m_new) + n_replay * max(1.0, p * m_replay)  # expected masked positions
            teacher = head if loaded["teacher"] else None
            last = head if loaded["masked_last_layer"] else None
        flops = step_flops(shape, batch, seq, head_positions=head, teacher_positions=teacher, last_layer_rows=last)
        model_rate = flops["total"] / sps
        entry = {"label": LABELS[base] + (" (compiled)" if "+compile" in c else ""),
                 "seconds_per_step": sps, "seconds_per_step_windows": per_window,
                 "tokens_per_second": tokens / sps, "peak_memory_bytes": res["final"]["peak_memory_bytes"],
                 "head_positions_per_step": head, "flops_per_step": flops, "model_flops_per_s": model_rate,
                 "matmul_fraction": None,
                 "mfu": model_rate / peak if peak else None,
                 "load_avg_before_windows": res["load_avg"],
                 "step_seconds": [w["step_seconds"] for w in res["windows"]],
                 # process CPU seconds per step (all threads): with other load on the machine, wall
                 # time grows while this mostly does not
                 "cpu_seconds_per_step": statistics.median(w["cpu_seconds"] / w["steps"] for w in res["windows"]),
                 # wall time outside on_step_begin..on_step_end (HF: fetching and collating the batch,
                 # logging); incr's step function includes its own sampling and masking
                 "outside_step_seconds": statistics.median(
                     (w["seconds"] - sum(w.get("compute_seconds", []))) / w["steps"] for w in res["windows"]),
                 "details": {k: v for k, v in loaded.items() if k != "kind"}}
        if "profile" in res:
            entry["profile"] = res["profile"]
        configs[c] = entry
    return {"precision": precision, "seq_len": seq, "batch": batch, "tokens_per_step": tokens,
            "configs": configs, "ratios": paired_ratios(raw, "seconds"),
            # the same from process CPU seconds: a diagnostic for a busy machine, not the target
            "cpu_ratios": paired_ratios(raw, "cpu_seconds")}


def paired_ratios(raw: dict[str, Any], key: str) -> dict[str, float]:
    """{"x/a": median over rounds of a's time per step over x's in the same round} for every x != a."""
    if "a" not in raw:
        return {}
    per_step = {c: [w[key] / w["steps"] for w in res["windows"]] for c, res in raw.items()}
    return {f"{c}/a": statistics.median(a / x for a, x in zip(per_step["a"], mine))
            for c, mine in per_step.items() if c != "a"}


def check_targets(args: argparse.Namespace, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for g in groups:
        where = f"{g['precision']} seq {g['seq_len']}"
        cfg, ratios = g["configs"], g["ratios"]
        wanted = GPU_TARGETS if args.gpu else CPU_TARGETS.get(g["precision"], {})
        for name, minimum in wanted.items():
            if name in ratios:
                value = ratios[name]
            elif name == "c_matmul_fraction" and "c" in cfg:
                value = cfg["c"]["matmul_fraction"]
            elif name == "c_mfu" and "c" in cfg:
                value = cfg["c"]["mfu"]
            else:
                continue
            if value is not None:
                out.append({"target": f"{where}: {name} >= {minimum:g}", "value": value, "minimum": minimum,
                            "passed": value >= minimum, "short_by": max(0.0, minimum - value)})
        if "a" in cfg and "c" in cfg:
            a_mem, c_mem = cfg["a"]["peak_memory_bytes"], cfg["c"]["peak_memory_bytes"]
            out.append({"target": f"{where}: peak memory c <= a", "value": c_mem / a_mem, "minimum": None,
                        "passed": c_mem <= a_mem, "short_by": max(0.0, c_mem / a_mem - 1.0)})
    return out


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    cpu, flags = platform.processor(), []
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = f.readlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), cpu)
        present = set(next((ln for ln in lines if ln.startswith("flags")), "").split())
        flags = [f for f in MATMUL_FLAGS if f in present]
    except OSError:
        pass
    info = {"cpu": cpu, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "cpu_bf16_matmul": cpu_has_bf16_matmul(), "cpu_matmul_flags": flags, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "platform": platform.platform(),
            "load_avg_start": os.getloadavg()}
    if args.gpu and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ----------------------------------------------------------------------------- main


def precisions_to_run(args: argparse.Namespace, say: Any = print) -> tuple[list[str], list[dict]]:
    """The precisions to measure, and those skipped with why: `auto` drops bf16 on CPUs without bf16 units."""
    precisions, skipped = list(args.precisions), []
    if not args.gpu and "bf16" in precisions and not cpu_has_bf16_matmul():
        reason = ("this CPU has no bf16 matrix instructions (no AMX / AVX512-BF16): bf16 matmuls are emulated, "
                  "hundreds of times slower than fp32 here (see the matmul rates)")
        if args.auto_precision:
            precisions.remove("bf16")
            skipped.append({"precision": "bf16", "reason": reason + "; skipped (force with --precision fp32,bf16)"})
            say(f"[yellow]bf16 skipped: {reason}[/yellow]")
        else:
            say(f"[yellow]bf16 measured anyway, but emulated: {reason}[/yellow]")
    return precisions, skipped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 140)
    say = console.print
    import torch

    if args.gpu and not torch.cuda.is_available():
        say("[red]--gpu: no CUDA device is available[/red]")
        return 2
    torch.set_num_threads(args.threads)
    machine = machine_info(args)
    precisions, skipped = precisions_to_run(args, say)

    tok = _data.model_choice(quick=args.quick, gpu=args.gpu, cpu_shape=MINILM, gpu_shape=BERT_BASE)
    device = "cuda" if args.gpu else "cpu"
    say(f"model {tok['shape'].to_dict()} weights={tok['weights'] or 'random init'}; tokenizer {tok['tokenizer']}; "
        f"{args.threads} threads; load average {machine['load_avg_start'][0]:.2f}")
    rates_before = machine_rates(device=device, quick=args.quick, native_bf16=machine["cpu_bf16_matmul"])
    peak = known_gpu_peak(machine.get("gpu", "")) if args.gpu else None

    groups = []
    with tempfile.TemporaryDirectory(prefix="incr-bench-") as tmp:
        tmp_path = Path(tmp)
        tokenizer = _data.load_tokenizer(tok["tokenizer"])
        for seq in args.seqs:
            data = _data.prepare(tmp_path, tokenizer, seq, max_lines=100 if args.quick else None)
            for precision in precisions:
                say(f"[bold]{precision}, seq {seq}, batch {batch_for(args, seq)}[/bold]: "
                    f"{data['new']['rows']} new rows, {data['replay']['rows']} replay rows")
                raw = run_group(args, precision, seq, data, tok, tmp_path, say)
                groups.append(summarise_group(args, precision, seq, raw, data, tok["shape"], peak))
    rates_after = machine_rates(device=device, quick=args.quick, native_bf16=machine["cpu_bf16_matmul"])
    rates = best_rates(rates_before, rates_after)
    for g in groups:  # fractions against the best rate seen in this run
        rate = rates.get(g["precision"], {}).get("flops_per_s")
        for entry in g["configs"].values():
            entry["matmul_fraction"] = entry["model_flops_per_s"] / rate if rate else None
    machine["load_avg_end"] = os.getloadavg()

    scaling = None
    if args.scaling:
        import _scaling

        say("[bold]scaling[/bold]: an increment with 1, 5 and 20 earlier increments (scratch:tiny, 1 thread)")
        scaling = _scaling.run(say=say)

    targets = check_targets(args, groups)
    result = {"benchmark": "train", "mode": "gpu" if args.gpu else "cpu",
              "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine, "flop_formula": FORMULA, "gpu_peak_bf16_flops": peak,
              "settings": {"configs": args.config_list, "precisions": precisions, "seqs": args.seqs,
                           "warmup": args.warmup, "steps": args.steps, "repeats": args.repeats,
                           "threads": args.threads, "profile_steps": args.profile, "quick": args.quick,
                           "model": tok["shape"].to_dict(), "weights": tok["weights"], "tokenizer": tok["tokenizer"]},
              "matmul": rates, "groups": groups, "skipped": skipped, "targets": targets, "scaling": scaling}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    _report.render(console, result)
    say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
