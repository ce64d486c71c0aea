"""Rendering bench_train.py's result dict: rich tables, the FLOP formula, PASS/SHORT per target."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _si(x: float | None, unit: str = "") -> str:
    if x is None:
        return "n/a"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.2f} {unit}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def render(console: Console, result: dict[str, Any]) -> None:
    m = result["machine"]
    gpu = result["mode"] == "gpu"
    flags = " ".join(m.get("cpu_matmul_flags") or []) or "none of avx2/avx512f/avx512_bf16/amx"
    console.print(f"machine: {m['cpu']}, {m['cores']} cores (flags: {flags})" + (f", {m['gpu']}" if m.get("gpu") else "")
                  + f"; bf16 matrix instructions: {'yes' if m['cpu_bf16_matmul'] else 'no'}; torch {m['torch']}, "
                  f"transformers {m['transformers']}; load average {m['load_avg_start'][0]:.2f} at the start, "
                  f"{m['load_avg_end'][0]:.2f} at the end")
    for prec, r in result["matmul"].items():
        note = " (emulated: no bf16 matrix instructions)" if r.get("emulated") else ""
        console.print(f"matmul {prec}: {_si(r['flops_per_s'], 'FLOP/s')} ({r['size']}^3, best of the run){note}")
    if gpu and result.get("gpu_peak_bf16_flops"):
        console.print(f"GPU dense bf16 peak (data sheet): {_si(result['gpu_peak_bf16_flops'], 'FLOP/s')}")
    console.print(f"model FLOPs: {result['flop_formula']}")
    for g in result["groups"]:
        table = Table(title=f"{g['precision']}, batch {g['batch']} x seq {g['seq_len']} "
                            f"({g['tokens_per_step']} tokens/step), median of windows")
        for col in ("config", "s/step", "tokens/s", "x vs a", "x vs a (cpu s)", "peak mem", "FLOPs/step",
                    "model FLOP/s", "of matmul", *(["MFU"] if gpu else [])):
            table.add_column(col, justify="left" if col == "config" else "right")
        for name, c in g["configs"].items():
            ratio, cpu_ratio = g["ratios"].get(f"{name}/a"), g.get("cpu_ratios", {}).get(f"{name}/a")
            table.add_row(f"({name}) {c['label']}", f"{c['seconds_per_step']:.3f}", f"{c['tokens_per_second']:,.0f}",
                          "1.00" if name == "a" else ("n/a" if ratio is None else f"{ratio:.2f}"),
                          "1.00" if name == "a" else ("n/a" if cpu_ratio is None else f"{cpu_ratio:.2f}"),
                          _si(c["peak_memory_bytes"], "B"), _si(c["flops_per_step"]["total"]),
                          _si(c["model_flops_per_s"]), _pct(c["matmul_fraction"]),
                          *([_pct(c["mfu"])] if gpu else []))
        console.print(table)
        for name, c in g["configs"].items():
            prof = c.get("profile")
            if not prof:
                continue
            top = ", ".join(f"{o['op']} {o['share']:.0%}" for o in prof["ops"][:6])
            console.print(f"  profile ({name}), {prof['total_ms_per_step']:.0f} ms/step of op self time: {top}")
    for s in result["skipped"]:
        console.print(f"[yellow]skipped {s['precision']}: {s['reason']}[/yellow]")
    if result.get("scaling"):
        render_scaling(console, result["scaling"])
    for t in result["targets"]:
        status = "[green]PASS[/green]" if t["passed"] else "[red]SHORT[/red]"
        if t["minimum"] is None:
            detail = f"c/a = {t['value']:.2f} of a's peak memory"
        else:
            detail = f"{t['value']:.2f}" + ("" if t["passed"] else f" (short by {t['short_by']:.2f})")
        console.print(f"{status} {t['target']}: {detail}")


def render_scaling(console: Console, s: dict[str, Any]) -> None:
    table = Table(title=f"cost as history grows: {s['new_sequences']} new sequences, {s['steps']} steps, "
                        f"{s['model']}")
    for col in ("earlier increments", "train loop s", "s/step", "sampler ms/batch", "whole increment s",
                "eval row s", "eval s/cell"):
        table.add_column(col, justify="right")
    for row in s["rows"]:
        table.add_row(str(row["earlier"]), f"{row['train_seconds']:.2f}", f"{row['seconds_per_step']:.3f}",
                      f"{row['sampler_ms_per_batch']:.3f}", f"{row['wall_seconds']:.2f}",
                      f"{row['eval_row_seconds']:.2f}", f"{row['eval_seconds_per_cell']:.3f}")
    console.print(table)
    console.print(f"  {s['note']}")
