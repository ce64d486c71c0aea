"""Render a workspace's TensorBoard data to one PNG (the README's picture of the dashboard).

    .venv/bin/python scripts/tensorboard_png.py WS OUT.png

Reads WS/tensorboard with TensorBoard's own reader: per version the training loss and the
gradient norm against the step, and from the `line` run the held-out perplexity after each version.
"""

from __future__ import annotations

import sys
from pathlib import Path


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def render(board: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    versions = sorted(p for p in board.iterdir() if p.is_dir() and p.name.startswith("v"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for folder in versions:
        data = scalars(folder)
        for ax, tag in zip(axes[:2], ("train/total", "train/grad_norm")):
            steps, values = zip(*data[tag])
            ax.plot(steps, values, marker=".", label=folder.name)
    line = scalars(board / "line")
    for tag, points in sorted(line.items()):
        if tag.startswith("eval/after/") and tag.endswith("/perplexity"):
            steps, values = zip(*points)
            axes[2].plot(steps, values, marker="o", label=tag.split("/")[2])
    titles = ("train/total (loss) per version", "train/grad_norm (before clipping)",
              "line: held-out perplexity after each version")
    for ax, title, xlabel in zip(axes, titles, ("step", "step", "version")):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.legend(fontsize=8)
    axes[2].set_yscale("log")
    axes[2].xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    fig.savefig(out, dpi=90)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    render(Path(sys.argv[1]) / "tensorboard", Path(sys.argv[2]))
