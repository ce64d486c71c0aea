"""README's int8 table: a version as torch fp32, as `incr export --format onnx` and as `--quantize int8`,
compared like with like on the version's own held-out data.

    python scripts/int8_table.py WS [--version V] [--threads 1] [--json OUT.json]

- The same graphs: fill-mask = (ids, mask) -> logits for every position (B, T, V), as
  `pipeline("fill-mask")` and ONNX Runtime users compute it; embeddings = the encoder and mean
  pooling only (no vocabulary head): torch runs `incr embed`'s code, ONNX Runtime `encoder.onnx`.
- The same inputs: the first `eval.max_sequences` held-out rows of each increment the version was
  trained on, in batches of `eval.batch_size`; the same threads (torch.set_num_threads and ONNX
  Runtime's intra_op_num_threads = --threads, one inter-op thread).
- Speed: non-padding tokens / s, best of 3 rounds taken in turns (load from other jobs hurts all alike).
- Accuracy: held-out masked-token top-1 accuracy with `incr eval`'s masks (score_increment), and the
  cosine / neighbour overlap at 10 of each text's int8 embedding to its torch fp32 embedding.
Nothing is computed here but through the library and ONNX Runtime; numbers are printed as measured.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from doc_tables import int8_table  # scripts/ is on sys.path when this runs as a script
from torch import nn

from incr_cli.config.recipe import load_recipe
from incr_cli.line.export import ENCODER_GRAPH, FILL_MASK_GRAPH, export_version
from incr_cli.model.heads import MaskedLMHead
from incr_cli.model.weights import load_version
from incr_cli.scoring.embed import EmbedSettings, embed_ids, embedding_drift
from incr_cli.scoring.score import read_heldout, score_increment
from incr_cli.store.workspace import Workspace

ROUNDS = 3


class OrtHead(nn.Module):
    """score_sequences' head over a fill-mask ONNX session: full logits, then the masked positions."""

    def __init__(self, session: ort.InferenceSession):
        super().__init__()
        self.session = session

    def forward(self, input_ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor):
        logits = self.session.run(["logits"], {"input_ids": input_ids.numpy(),
                                               "attention_mask": attention.long().numpy()})[0]  # (B, T, V)
        return torch.from_numpy(logits)[positions], None  # (n, V)


def session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def timed(runners: dict, ids: torch.Tensor, attention: torch.Tensor, batch: int) -> dict[str, float]:
    """{name: best tokens/s over ROUNDS turns} of each runner(ids, attention) over batches of ``batch`` rows."""
    tokens = int(attention.sum())
    best = dict.fromkeys(runners, 0.0)
    for run in runners.values():
        run(ids[:batch], attention[:batch])  # warm-up
    for _ in range(ROUNDS):
        for name, run in runners.items():
            start = time.perf_counter()
            for i in range(0, len(ids), batch):
                run(ids[i:i + batch], attention[i:i + batch])
            best[name] = max(best[name], tokens / (time.perf_counter() - start))
    return best


def measure(ws: Workspace, version: str, threads: int, folder: Path) -> dict:
    torch.set_num_threads(threads)
    recipe = load_recipe(ws.recipe_path)
    model, tokenizer = load_version(ws, version)
    fp32_onnx, int8 = folder / "fp32-onnx", folder / "int8"
    export_version(ws, version, fp32_onnx, file_format="onnx")  # the command's own paths:
    export_version(ws, version, int8, quantize="int8")  # incr export --format onnx / --quantize int8
    increments = ws.trained_on(version)
    rows = np.concatenate([np.asarray(read_heldout(ws, inc)[: recipe.eval.max_sequences]) for inc in increments])
    ids = torch.from_numpy(rows.astype(np.int64))  # (N, T)
    attention = ids != tokenizer.pad_token_id
    fill = {"torch fp32": lambda i, a: model(input_ids=i, attention_mask=a.long()).logits}
    enc = {"torch fp32": lambda i, a: embed_ids(model, i, a, settings=EmbedSettings(batch_size=len(i)))}
    sessions = {"onnx fp32": fp32_onnx, "onnx int8": int8}
    for name, where in sessions.items():
        fm, en = session(where / FILL_MASK_GRAPH, threads), session(where / ENCODER_GRAPH, threads)
        fill[name] = lambda i, a, s=fm: s.run(["logits"], {"input_ids": i.numpy(), "attention_mask": a.long().numpy()})
        enc[name] = lambda i, a, s=en: s.run(["sentence_embedding"], {"input_ids": i.numpy(),
                                                                      "attention_mask": a.long().numpy()})[0]
    with torch.inference_mode():
        speed = {"fill_mask": timed(fill, ids, attention, recipe.eval.batch_size),
                 "embeddings": timed(enc, ids, attention, recipe.eval.batch_size)}
        reference = embed_ids(model, ids, attention, settings=EmbedSettings(batch_size=recipe.eval.batch_size))
        accuracy, cosine = {}, {}
        heads = {"torch fp32": MaskedLMHead(model)}
        heads.update({name: OrtHead(session(where / FILL_MASK_GRAPH, threads)) for name, where in sessions.items()})
        for name, head in heads.items():
            accuracy[name] = {inc: score_increment(head, ws, inc, recipe, tokenizer)["accuracy"]
                              for inc in increments}
        for name in sessions:
            emb = np.concatenate([enc[name](ids[i:i + 64], attention[i:i + 64]) for i in range(0, len(ids), 64)])
            cosine[name] = embedding_drift(reference, emb)
    size = {"torch fp32": (ws.version_dir(version) / "model.safetensors").stat().st_size}
    size.update({name: {g: (where / g).stat().st_size for g in (FILL_MASK_GRAPH, ENCODER_GRAPH)}
                 for name, where in sessions.items()})
    return {"workspace": str(ws.root), "version": version, "threads": threads, "rows": int(ids.shape[0]),
            "seq_len": int(ids.shape[1]), "tokens": int(attention.sum()), "increments": increments,
            "bytes": size, "tokens_per_second": speed, "accuracy": accuracy, "embedding_vs_torch_fp32": cosine}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workspace", type=Path)
    parser.add_argument("--version")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    ws = Workspace.open(args.workspace)
    with tempfile.TemporaryDirectory(prefix="incr-int8-") as tmp:
        m = measure(ws, ws.resolve_version(args.version), args.threads, Path(tmp))
    if args.json:
        args.json.write_text(json.dumps(m, indent=2) + "\n", encoding="utf-8")
    print(f"{m['version']} of {m['workspace']}: {m['rows']} held-out rows x {m['seq_len']} tokens "
          f"({m['tokens']:,} non-padding) of {', '.join(m['increments'])}\n")
    print(int8_table(m))  # README's table, as scripts/doc_tables.py renders it from the JSON


if __name__ == "__main__":
    main()
