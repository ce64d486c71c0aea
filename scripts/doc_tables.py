"""The docs' tables from the committed results they were measured into, so a figure in README.md or a
page of docs/ is always one a file holds: each table sits between

    <!-- table:NAME begin (scripts/doc_tables.py from results/FILE.json; do not edit) -->
    <!-- table:NAME end -->

and is rendered here from that file (``TABLES``). ``tests/docs/test_docs.py`` fails when a page and
the files disagree.

    python scripts/doc_tables.py           # rewrite the pages' tables from results/
    python scripts/doc_tables.py --check   # exit 1 when any table differs (what the test checks)

Each JSON is written by the script that measured it: results/int8-table.json by
``scripts/int8_table.py WS --json``, results/compress-check.json by ``scripts/compress_check.py``,
results/vocab-growth.json is ``scripts/vocab_growth.py``'s OUT/results.json, results/history-cost.json
``benchmarks/bench_history.py --out``, results/bench-train.json ``benchmarks/bench_train.py --out``, results/stream.json ``scripts/stream.py``,
results/precision-check.json ``scripts/precision_check.py compare --out``, results/drift-demo.json ``scripts/serving_table.py --drift-json``.
Rendering is formatting only: no number is computed here but ratios of two measured ones.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f}"


def int8_table(m: dict) -> str:
    """scripts/int8_table.py's measurement -> torch fp32 vs ONNX fp32 vs ONNX int8."""
    names = ["torch fp32", "onnx fp32", "onnx int8"]
    graphs = ("model.onnx", "encoder.onnx")
    ref = m["tokens_per_second"]
    lines = ["| | torch fp32 | ONNX fp32 (`--format onnx`) | ONNX int8 (`--quantize int8`) |",
             "| --- |" + " ---: |" * len(names),
             "| size on disk (MB): fill-mask graph / encoder graph | "
             f"{_mb(m['bytes']['torch fp32'])} (one safetensors file for both) | "
             + " | ".join(f"{_mb(m['bytes'][n][graphs[0]])} / {_mb(m['bytes'][n][graphs[1]])}" for n in names[1:]) + " |"]
    for task in ("fill_mask", "embeddings"):
        base = ref[task]["torch fp32"]
        lines.append(f"| {task.replace('_', '-')} tokens/s ({m['threads']} thread) | "
                     + " | ".join(f"{ref[task][n]:,.0f} ({ref[task][n] / base:.2f}x)" for n in names) + " |")
    for inc in m["increments"]:
        lines.append(f"| {inc} held-out masked-token accuracy (%) | "
                     + " | ".join(f"{100 * m['accuracy'][n][inc]:.1f}" for n in names) + " |")
    lines.append("| embedding mean cosine to torch fp32 / neighbour overlap@10 | 1 / 1 | "
                 + " | ".join(f"{m['embedding_vs_torch_fp32'][n]['mean_cosine']:.4f} / "
                              f"{m['embedding_vs_torch_fp32'][n]['neighbour_overlap']:.3f}" for n in names[1:]) + " |")
    return "\n".join(lines)


COMPRESS_COLUMNS = ("teacher+steps", "student", "student, no distillation")


def compress_table(m: dict) -> str:
    """scripts/compress_check.py's measurement -> the teacher, the teacher trained as long as the
    students, the distilled student and the student trained without distillation."""
    lines_ = m["lines"]
    first = lines_["student"]["metrics"]
    inc = next(iter(first["eval"]["teacher"]))
    task = m["task"]

    def cell_task(scores: dict) -> str:
        low, high = scores["accuracy_ci"]
        return f"{100 * scores['accuracy']:.1f} ({100 * low:.1f}-{100 * high:.1f})"

    header = ["| | teacher v0001 | " + " | ".join(f"{c} ({lines_[c]['layers']} layers)" for c in COMPRESS_COLUMNS) + " |",
              "| --- | ---: |" + " ---: |" * len(COMPRESS_COLUMNS)]
    t = first["teacher"]
    rows = [("parameters", f"{t['parameters']:,}", [f"{lines_[c]['metrics']['student']['parameters']:,}"
                                                    for c in COMPRESS_COLUMNS]),
            ("weights on disk (MB)", _mb(t["weights_bytes"]),
             [_mb(lines_[c]["metrics"]["student"]["weights_bytes"]) for c in COMPRESS_COLUMNS]),
            # each line measured its teacher and itself side by side: the ratio is of one run
            ("encoder inference speed vs the teacher (measured in the same run)", "1.00x",
             [f"{lines_[c]['metrics']['student']['tokens_per_second'] / lines_[c]['metrics']['teacher']['tokens_per_second']:.2f}x"
              for c in COMPRESS_COLUMNS]),
            (f"{inc} held-out perplexity", f"{first['eval']['teacher'][inc]['perplexity']:.1f}",
             [f"{lines_[c]['metrics']['eval']['student'][inc]['perplexity']:.1f}" for c in COMPRESS_COLUMNS]),
            (f"{inc} held-out masked-token accuracy (%)", f"{100 * first['eval']['teacher'][inc]['accuracy']:.1f}",
             [f"{100 * lines_[c]['metrics']['eval']['student'][inc]['accuracy']:.1f}" for c in COMPRESS_COLUMNS]),
            (f"task accuracy (%), 95% interval: {Path(task['file']).name}", cell_task(task["teacher"]),
             [cell_task(task[c]) for c in COMPRESS_COLUMNS]),
            ("training (s)", "-", [f"{lines_[c]['metrics']['train_seconds']:.0f}" for c in COMPRESS_COLUMNS])]
    return "\n".join(header + [f"| {name} | {a} | " + " | ".join(b) + " |" for name, a, b in rows])


def vocab_table(r: dict) -> str:
    """scripts/vocab_growth.py's results.json -> the grown line against the plain one, and their fill-mask."""
    p, g, tok = r["plain"], r["grown"], r["ingest"]["tokens"]
    inc_new, inc_old = p["data"]["new"][0], p["data"]["earlier"][0]

    def acc(m: dict, key: str = "after", inc: str = inc_new) -> str:
        s = m["eval"][key][inc]
        return f"{100 * s['accuracy']:.1f}% (ppl {s['perplexity']:.1f})"

    rows = [
        ("tokens per document (train / held-out)",
         f"{tok['train']['per_document_before']} / {tok['heldout']['per_document_before']}",
         f"{tok['train']['per_document_after']} / {tok['heldout']['per_document_after']}"),
        ("training tokens/s (1 thread each, run side by side)", f"{p['tokens_per_second']:,.0f}",
         f"{g['tokens_per_second']:,.0f}"),
        (f"{inc_new} held-out masked-token accuracy, all positions", acc(p), acc(g)),
        (f"{inc_new} accuracy on positions whose target the old vocabulary has", acc(p),
         acc(g, "after_shared_vocab")),
        (f"{inc_old} accuracy after (was {100 * p['eval']['before'][inc_old]['accuracy']:.1f}%)",
         acc(p, inc=inc_old), acc(g, inc=inc_old)),
        (f"forgetting on {inc_old} (relative perplexity change)", f"{p['forgetting'][inc_old]:+.1%}",
         f"{g['forgetting'][inc_old]:+.1%}"),
    ]
    for name, t in (p.get("tasks") or {}).get("tasks", {}).items():
        tg = g["tasks"]["tasks"][name]

        def task(rec: dict) -> str:
            low, high = rec["after"]["accuracy_ci"]
            return f"{100 * rec['after']['accuracy']:.1f}% ({100 * low:.1f}-{100 * high:.1f}), change {rec['change']:+.3f}"

        rows.append((f"task {name}: accuracy after, 95% interval (was {100 * t['before']['accuracy']:.1f}%)",
                     task(t), task(tg)))
    rows.append(("the gate", "promoted" if p["promoted"] else "rejected", "promoted" if g["promoted"] else "rejected"))
    lines = ["| | without extension | with extension |", "| --- | ---: | ---: |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += ["", "| sentence | without extension | with extension |", "| --- | --- | --- |"]
    lines += [f"| {s} | {', '.join(a)} | {', '.join(b)} |"
              for s, a, b in zip(r["sentences"], r["fill"]["plain"], r["fill"]["grown"])]
    return "\n".join(lines)


def ingest_scale_table(m: dict) -> str:
    """benchmarks/bench_ingest_scale.py's measurement -> size, cores and formats against the raw tokenizer."""
    lines = ["| run | input | documents | seconds | docs/s | MB/s | peak RSS (MB) | against |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in m["sizes"].values():
        lines.append(f"| ingest, {m['cores']} cores | {r['mb']:,.0f} MB | {r['documents']:,} | {r['seconds']:,.0f} | "
                     f"{r['docs_per_s']:,.0f} | {r['mb_per_s']:.2f} | {r['peak_rss'] / 1e6:,.0f} | |")
    first = next(iter(m["sizes"].values()))
    names = {"raw": "raw tokenizer", "raw_call": "raw `tokenizer(batch)`", "raw_fast": "raw `encode_batch_fast`"}
    for cores, runs in m["cores_runs"].items():
        ing, raws = runs["ingest"], {k: v for k, v in runs.items() if k != "ingest"}
        against = "; ".join(f"{ing['docs_per_s'] / r['docs_per_s']:.0%} of {names[k].removeprefix('raw ')}"
                            for k, r in raws.items())
        lines.append(f"| ingest, {cores} core(s) | {first['mb']:,.0f} MB | {ing['docs']:,} | {ing['seconds']:,.0f} | "
                     f"{ing['docs_per_s']:,.0f} | {ing['mb_per_s']:.2f} | {ing['peak_rss'] / 1e6:,.0f} | {against} |")
        for k, raw in raws.items():
            lines.append(f"| {names[k]}, {cores} core(s) | {first['mb']:,.0f} MB | {raw['docs']:,} | "
                         f"{raw['seconds']:,.0f} | {raw['docs_per_s']:,.0f} | | {raw['peak_rss'] / 1e6:,.0f} | |")
    plain = m["formats"]["lines"]["docs_per_s"]
    for name, r in m["formats"].items():
        lines.append(f"| ingest `{name}`, {m['cores']} cores | {r['mb_per_s'] * r['seconds']:,.0f} MB | {r['docs']:,} | "
                     f"{r['seconds']:,.0f} | {r['docs_per_s']:,.0f} | {r['mb_per_s']:.2f} | {r['peak_rss'] / 1e6:,.0f} | "
                     f"{r['docs_per_s'] / plain:.0%} of plain text's docs/s |")
    return "\n".join(lines)


def reader_scale_table(m: dict) -> str:
    """benchmarks/bench_reader_scale.py --out: drawing batches from a long history, per history length."""
    lines = ["| reader | replay split | earlier increments | their rows (GB) | open (s) | ms/batch, warm | "
             "ms/batch, cold | RSS: anonymous (MB) | RSS: mapped files (MB) | peak RSS (MB) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in m["rows"]:
        cold = "" if r["ms_per_batch_cold"] is None else f"{r['ms_per_batch_cold']:.2f}"
        lines.append(f"| {r['reader']} | {r['split']} | {r['k']} | {r['history_gb']:.2f} | {r['open_seconds']:.2f} | "
                     f"{r['ms_per_batch_warm']:.2f} | {cold} | {r['anon_rss'] / 1e6:,.0f} | {r['file_rss'] / 1e6:,.0f} | "
                     f"{r['peak_rss'] / 1e6:,.0f} |")
    v = m["verify"]
    lines += ["", f"Measured {m['date']}: {m['increments']} increments, {m['gb']:g} GB of rows ({m['seq_len']} tokens a "
                  f"row), {m['batches']:,} micro-batches of {m['new']} new + {m['replay']} replayed rows per phase, "
                  f"{m['machine']['cores']} cores. The first verification of every increment (each byte hashed) took "
                  f"{v['first_seconds']:.0f} s, a later one (checksums cached by file stat) {v['cached_seconds']:.2f} s."]
    return "\n".join(lines)


def history_table(m: dict) -> str:
    """benchmarks/bench_history.py --out: one increment's cost outside the loop per history length."""
    base = m["rows"][0]["outside_cpu_s"]
    lines = ["| earlier increments | whole increment, wall (s) | training loop, wall (s) | outside the loop, wall (s) | "
             "outside the loop, CPU (s) | CPU vs first | cells scored before / reused | increments scored after "
             "(sequences) | scored twice | task scoring, wall (s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in m["rows"]:
        lines.append(f"| {r['k']} | {r['total_s']:.2f} | {r['train_s']:.2f} | {r['outside_s']:.2f} | "
                     f"{r['outside_cpu_s']:.2f} | {r['outside_cpu_s'] / base:.2f}x | {r['before_scored']} / "
                     f"{r['before_recorded']} | {r['after_scored']} ({r['sequences']}) | {r['scored_twice']} | "
                     f"{r['task_s']:.2f} |")
    if "date" in m:
        lines += ["", f"Measured {m['date']}: {m['steps']} steps, {m['repeats']} runs per size (the least CPU time "
                      f"outside the loop kept), {m['cores']} cores at a load average of about {m['load']}."]
    return "\n".join(lines)


def drift_table(m: dict) -> str:
    """scripts/serving_table.py --drift-json: each line's embedding drift against the same parent."""
    lines = ["| line | version | mean cosine (all) | neighbour overlap@10 (all) | per increment: mean cosine / overlap |",
             "| --- | --- | ---: | ---: | --- |"]
    for r in m["lines"]:
        d = r["drift"]
        per = "; ".join(f"{inc} {v['mean_cosine']:.3f} / {v['neighbour_overlap']:.3f}"
                        for inc, v in d["increments"].items())
        lines.append(f"| {r['name']} | {r['version']} vs {d['parent']} | {d['all']['mean_cosine']:.3f} | "
                     f"{d['all']['neighbour_overlap']:.3f} | {per} |")
    return "\n".join(lines)


def speed_table(m: dict) -> str:
    """benchmarks/bench_train.py --out: each configuration per precision, then each target met or short."""
    mach, st = m["machine"], m["settings"]
    lines = [f"Measured {m['created'][:16].replace('T', ' ')} UTC on a {mach['cores']}-core {mach['cpu']} "
             f"({', '.join(mach['cpu_matmul_flags'])}), torch {mach['torch']}, {st['threads']} thread(s), "
             f"{st['repeats']} windows of {st['steps']} steps after {st['warmup']} warm-up, load average "
             f"{mach['load_avg_start'][0]:.1f} at the start; large-matmul rate "
             + ", ".join(f"{p} {v['flops_per_s'] / 1e9:,.0f} GFLOP/s" for p, v in m["matmul"].items()) + ".", "",
             "| precision | configuration | s / step | CPU s / step | tokens/s | peak memory (GB) | GFLOP / step | of the matmul rate |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for g in m["groups"]:
        for key, c in g["configs"].items():
            lines.append(f"| {g['precision']} | ({key}) {c['label']} | {c['seconds_per_step']:.3f} | "
                         f"{c['cpu_seconds_per_step']:.3f} | {c['tokens_per_second']:,.0f} | "
                         f"{c['peak_memory_bytes'] / 1e9:.2f} | {c['flops_per_step']['total'] / 1e9:.1f} | "
                         f"{c['matmul_fraction']:.0%} |")
    lines += ["", "The targets, as the benchmark judged them (its ratios pair the configurations' windows):", "",
              "| target | measured | |", "| --- | ---: | --- |"]
    for t in m["targets"]:
        verdict = "met" if t["passed"] else f"short by {t['short_by']:.2f}"
        lines.append(f"| {t['target']} | {t['value']:.2f} | {verdict} |")
    return "\n".join(lines)


def precision_table(m: dict) -> str:
    """scripts/precision_check.py compare --out: the bf16-trained line against the fp32-trained one."""
    ref, new = m["reference"], m["candidate"]
    lines = [f"Steps {', '.join(map(str, ref['steps']))}; overrides {' '.join(ref['overrides']) or 'none'}; "
             f"tolerance {m['tolerance']:.0%}: largest change {m['largest_change']:.2%} of perplexity, "
             f"{'within' if m['within'] else 'NOT within'} it.", "",
             f"| version | increment | {ref['precision']}-trained ppl | {new['precision']}-trained ppl (fp32 eval) | change "
             f"| scored at {new['precision']} |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for v, row in ref["perplexity_fp32_eval"].items():
        for inc, p_ref in row.items():
            p_new, own = new["perplexity_fp32_eval"][v][inc], new["perplexity_own_eval"][v][inc]
            lines.append(f"| {v} | {inc} | {p_ref:.2f} | {p_new:.2f} | {p_new / p_ref - 1:+.2%} | {own:.2f} |")
    lines += ["", "| version | train seconds fp32 -> bf16 | peak memory (GiB) fp32 -> bf16 |", "| --- | ---: | ---: |"]
    for v in ref["versions"]:
        a, b = ref["versions"][v], new["versions"][v]
        lines.append(f"| {v} | {a['train_seconds']:.1f} -> {b['train_seconds']:.1f} "
                     f"(x{a['train_seconds'] / b['train_seconds']:.2f}) | {a['peak_memory_bytes'] / 2**30:.2f} -> "
                     f"{b['peak_memory_bytes'] / 2**30:.2f} |")
    return "\n".join(lines)


def stream_table(m: dict) -> str:
    """scripts/stream.py's results/stream.json: its report (results/stream.md) below the title."""
    sys.path.insert(0, str(REPO / "scripts"))
    from _stream_report import markdown

    return markdown(m).split("\n", 2)[2].rstrip("\n")


TABLES: dict[str, tuple[str, Callable[[dict], str]]] = {
    "stream": ("results/stream.json", stream_table),
    "precision": ("results/precision-check.json", precision_table),
    "speed": ("results/bench-train.json", speed_table),
    "drift": ("results/drift-demo.json", drift_table),
    "history-cost": ("results/history-cost.json", history_table),
    "ingest-scale": ("results/ingest-scale.json", ingest_scale_table),
    "reader-scale": ("results/reader-scale.json", reader_scale_table),
    "int8": ("results/int8-table.json", int8_table),
    "compress": ("results/compress-check.json", compress_table),
    "vocab": ("results/vocab-growth.json", vocab_table),
}
BLOCK = re.compile(r"(<!-- table:(?P<name>[\w-]+) begin \(scripts/doc_tables\.py from (?P<file>[^;]+); "
                   r"do not edit\) -->\n)(?P<body>.*?)(<!-- table:(?P=name) end -->)", re.S)


def render(text: str) -> tuple[str, list[str]]:
    """A page's text with every table block rendered from its file -> (new text, names of the blocks)."""
    names: list[str] = []

    def fill(match: re.Match) -> str:
        name, file = match["name"], match["file"]
        if name not in TABLES or TABLES[name][0] != file:
            raise SystemExit(f"table {name!r} from {file}: not in scripts/doc_tables.py's TABLES")
        names.append(name)
        body = TABLES[name][1](json.loads((REPO / file).read_text(encoding="utf-8")))
        return match.group(1) + body + "\n" + match.group(5)

    return BLOCK.sub(fill, text), names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when a table differs from its file")
    args = ap.parse_args(argv)
    stale = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        new, names = render(text)
        if not names:
            continue
        shown = page.relative_to(REPO)
        if args.check:
            if new != text:
                stale.append(str(shown))
            else:
                print(f"{shown}: {len(names)} tables match their files ({', '.join(names)})")
            continue
        page.write_text(new, encoding="utf-8")
        print(f"{shown}: rendered {', '.join(names)}")
    if stale:
        print(f"{', '.join(stale)}: a table differs from its results file; run python scripts/doc_tables.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
