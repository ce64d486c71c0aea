"""`runtime.precision: auto`: which precision it picks, and that a run records the choice and why.

The CPU's bf16 flag is stubbed, so these pass alike on CPUs with and without AMX / AVX512-BF16;
the /proc/cpuinfo parser itself is tested on fake files of each kind of CPU.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from typer.testing import CliRunner

from incr_cli.cli.app import app
from incr_cli.runtime import device as devices
from tests.helpers_train import reset_faults

CPU = torch.device("cpu")
# the real check, taken before conftest's autouse fixture stubs it out for every test
REAL_CPU_CHECK = devices.cpu_has_bf16_matmul


@pytest.mark.parametrize("has_bf16, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_cpu_follows_the_bf16_matrix_units(monkeypatch, has_bf16, expected):
    monkeypatch.setattr(devices, "cpu_has_bf16_matmul", lambda: has_bf16)
    chosen, why = devices.choose_precision("auto", CPU)
    assert chosen == expected and devices.Placement.resolve(CPU, "auto").precision == expected
    assert why.startswith("auto: ") and ("AMX" in why)


@pytest.mark.parametrize("has_bf16", [True, False])
@pytest.mark.parametrize("spec", ["fp32", "bf16"])
def test_an_explicit_precision_is_kept_on_any_cpu(monkeypatch, has_bf16, spec):
    monkeypatch.setattr(devices, "cpu_has_bf16_matmul", lambda: has_bf16)
    assert devices.choose_precision(spec, CPU) == (spec, f"runtime.precision={spec} was asked for")


@pytest.mark.parametrize("has_bf16, expected", [(True, "bf16"), (False, "fp32")])
def test_a_run_records_autos_choice_in_metrics_and_manifest(monkeypatch, one_pending, has_bf16, expected):
    """A tiny bf16 run is cheap even where bf16 is emulated, so both branches train for real."""
    monkeypatch.setattr(devices, "cpu_has_bf16_matmul", lambda: has_bf16)
    reset_faults()
    result = CliRunner().invoke(app, ["train-increment", str(one_pending.root), "--json", "train.steps=2",
                                      "runtime.precision=auto", "eval.max_sequences=4"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((one_pending.version_dir("v0001") / "metrics.json").read_text())
    manifest = one_pending.version_manifest("v0001")
    assert metrics["precision"] == manifest["precision"] == expected
    choice = metrics["precision_choice"]
    assert choice == manifest["precision_choice"]
    assert choice["asked"] == "auto" and choice["chosen"] == expected and "bf16 matrix instructions" in choice["why"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_on_cuda_trains_distill_and_replay_in_bf16(two_increments):
    """The CUDA path end to end: bf16 autocast, the bf16 teacher, replay, the gate, the version."""
    reset_faults()
    result = CliRunner().invoke(app, ["train-increment", str(two_increments.root), "train.steps=3",
                                      "runtime.device=cuda", "runtime.precision=auto"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((two_increments.version_dir("v0002") / "metrics.json").read_text())
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    assert metrics["device"].startswith("cuda") and metrics["precision"] == expected
    assert metrics["precision_choice"]["why"].startswith("auto: this CUDA device")
    assert metrics["loss"]["distill"] is not None and metrics["data"]["replay"]


def test_precision_check_compare_passes_within_the_tolerance_only(tmp_path, capsys):
    """scripts/precision_check.py compare: bf16 vs fp32 per version and increment, exit 1 past 2%."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    import precision_check

    def doc(precision: str, ppl: float) -> Path:
        scores = {"v0001": {"d0001-austen": 100.0, "d0002-pydocs": ppl}}
        version = {"train_seconds": 10.0, "peak_memory_bytes": 2**30}
        path = tmp_path / f"{precision}-{ppl}.json"
        path.write_text(json.dumps({"precision": precision, "versions": {"v0001": version},
                                    "perplexity_fp32_eval": scores, "perplexity_own_eval": scores}))
        return path

    reference = doc("fp32", 200.0)
    assert precision_check.main(["compare", str(reference), str(doc("bf16", 203.9))]) == 0
    assert precision_check.main(["compare", str(reference), str(doc("bf16", 204.1))]) == 1
    assert "OVER" in capsys.readouterr().out


# ----------------------------------------------------------------------------- reading /proc/cpuinfo

_FLAGS_AVX2 = "fpu vme de pse tsc msr pae mce cx8 sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2"
_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: a test CPU
flags\t\t: {flags}
vmx flags\t: vnmi preemption_timer avx512_bf16_lookalike amx_bf16
bugs\t\t: spectre_v1

processor\t: 1
flags\t\t: {flags}
"""


@pytest.mark.parametrize("flags, expected", [
    (_FLAGS_AVX2, False),  # AVX2 only: bf16 would be emulated
    (_FLAGS_AVX2 + " avx512f avx512bw avx512_vnni", False),  # AVX-512 without its bf16 part
    (_FLAGS_AVX2 + " avx512f avx512_bf16", True),  # Cooper Lake, Zen 4
    (_FLAGS_AVX2 + " avx512f amx_tile amx_int8 amx_bf16", True),  # Sapphire Rapids
    (_FLAGS_AVX2 + " avx512_bf16x", False),  # whole flags only, never a prefix
])
def test_the_cpuinfo_parser_finds_bf16_matrix_units_in_the_flags_line_only(tmp_path, flags, expected):
    text = _CPUINFO.format(flags=flags)  # "vmx flags" names amx_bf16 on every variant: it must not count
    assert devices.cpuinfo_has_bf16(text) is expected
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    if sys.platform == "linux":
        assert REAL_CPU_CHECK(str(path)) is expected


def test_the_cpuinfo_reader_says_no_when_the_file_is_missing_or_has_no_flags(tmp_path):
    assert devices.cpuinfo_has_bf16("processor : 0\nmodel name : no flags here\n") is False
    assert devices.cpuinfo_has_bf16("") is False
    assert REAL_CPU_CHECK(str(tmp_path / "absent")) is False
    (tmp_path / "binary").write_bytes(b"flags\t: avx2 amx_bf16 \xff\xfe\n")  # undecodable bytes are replaced
    assert REAL_CPU_CHECK(str(tmp_path / "binary")) is (sys.platform == "linux")
