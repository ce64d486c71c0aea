"""README's quick start runs as written and prints what README shows: its commands are read from the
README's first ``bash`` block under "Quick start" and run in a fresh folder, and the table the second
``train-increment`` prints is held against the README's ``text`` block (the same rows; every
perplexity within 2%, which float rounding across CPUs stays far inside, a stale block does not)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
ROW = re.compile(r"^(d\d{4}-\S+)\s+(new|earlier)\s+([\d.]+)\s+([\d.]+)\s+([+-][\d.]+)%")


def quick_start() -> tuple[list[str], str]:
    """(the quick start's incr commands, the output block README shows for them)."""
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    shown = re.search(r"```text\n(.*?)```", section, re.S).group(1)
    lines = [line.split("#", 1)[0].strip() for line in commands.splitlines()]
    return [line for line in lines if line.startswith("incr ")], shown


def rows(text: str) -> dict[str, tuple[str, float, float, float]]:
    """{increment: (new/earlier, before, after, change %)} of a held-out table."""
    return {m[1]: (m[2], float(m[3]), float(m[4]), float(m[5])) for m in map(ROW.match, text.splitlines()) if m}


def test_the_readme_block_is_parsed():
    commands, shown = quick_start()
    assert commands[0].startswith("incr init") and sum(c.startswith("incr train-increment") for c in commands) == 2
    assert len(rows(shown)) == 2 and "v0002 promoted" in shown


@pytest.mark.slow
def test_the_quick_start_prints_what_the_readme_shows(tmp_path):
    commands, shown = quick_start()
    (tmp_path / "samples").symlink_to(ROOT / "samples")
    env = {**os.environ, "COLUMNS": "200"}
    outputs = []
    for command in commands:
        args = shlex.split(command)[1:]
        done = subprocess.run([sys.executable, "-m", "incr_cli", *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, f"{command}: {done.stderr[-2000:]}"
        outputs.append(done.stdout + done.stderr)
    second = [out for command, out in zip(commands, outputs) if command.startswith("incr train-increment")][1]
    printed, expected = rows(second), rows(shown)
    assert printed.keys() == expected.keys(), second
    for inc, (data, before, after, change) in expected.items():
        got = printed[inc]
        assert got[0] == data
        assert got[1] == pytest.approx(before, rel=0.02) and got[2] == pytest.approx(after, rel=0.02), (inc, got)
        assert got[3] == pytest.approx(change, abs=1.0), (inc, got)
    assert "v0002 promoted" in second
    stated = int(re.search(r"`scratch:tiny` is a (\d+)k-parameter", README)[1]) * 1000
    trained = int(re.search(r"([\d,]+) trainable parameters", second)[1].replace(",", ""))
    assert abs(trained - stated) <= 0.05 * stated, (trained, stated)
