"""Draw docs/images/seq1f1b_step.png: one Seq1F1B step, from the batch split to the K/V relay.

Run ``python -m pipelining_seq.tools.diagrams [PATH]`` (needs matplotlib: the ``viz`` or
``dev`` extra). The top band is the path of one step through the package's pieces; the
bottom band is one micro-batch of k=4 chunks on one stage: forwards in chunk order fill
the K/V cache, backwards run in reverse and relay the K/V gradients of earlier chunks back
to them.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

__all__ = ["DEFAULT_PATH", "draw_step"]

DEFAULT_PATH = Path("docs/images/seq1f1b_step.png")

# (title, module, what happens) for the top band
_PATH = [
    ("split", "seq_units.py", "the batch [B, S] into m micro-batches (dim 0), each into k chunks along the sequence"),
    ("units", "schedule_ir.py", "unit u = n·k + j; forwards by unit, backwards FIFO over micro-batches, LIFO over chunks"),
    ("stage", "stage.py", "SequencePipelineStage runs one unit's forward or backward, buffers sized to its chunk"),
    ("chunk context", "context.py", "micro-batch, chunk, offset, length and the KVCache, set while a unit runs"),
    ("attention", "attention.py", "ChunkedCausalAttention: chunk j's queries over the cached K/V of chunks < j and its own block"),
    ("K/V cache", "context.py", "each chunk's K, V stored detached, one copy per micro-batch, freed after chunk 0's backward"),
]

_BLUE, _GREEN, _ORANGE, _GREY = "#3b6ea8", "#4c9a5b", "#d9822b", "#8a8a8a"


def _box(ax, x, y, w, h, text, color, size=11, weight="normal", fill=0.14):
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                linewidth=1.6, edgecolor=color, facecolor=color, alpha=1.0))
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                linewidth=0, facecolor="white", alpha=1 - fill))
    ax.text(x, y, text, ha="center", va="center", fontsize=size, weight=weight, color="#1a1a1a")


def _arrow(ax, x0, y0, x1, y1, color, width=1.6, style="-|>", rad=0.0, ls="-"):
    from matplotlib.patches import FancyArrowPatch

    ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle=style, mutation_scale=14, linewidth=width,
                                 color=color, linestyle=ls, connectionstyle=f"arc3,rad={rad}", shrinkA=2, shrinkB=2))


def draw_step(path: str | Path = DEFAULT_PATH, k: int = 4) -> Path:
    """Draw the figure and write it to ``path`` (PNG); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(15, 10.5), dpi=110)
    ax.set_xlim(0, 15)
    ax.set_ylim(0, 10.5)
    ax.axis("off")

    # Top band: the path of one step through the package.
    ax.text(0.3, 10.15, "One step through the package", fontsize=15, weight="bold", va="center")
    xs = [1.3 + i * 2.48 for i in range(len(_PATH))]
    for i, (x, (title, module, what)) in enumerate(zip(xs, _PATH)):
        _box(ax, x, 9.45, 2.15, 0.55, f"{i + 1}. {title}", _BLUE, size=12, weight="bold", fill=0.3)
        ax.text(x, 9.03, module, ha="center", va="center", fontsize=10, family="monospace", color=_BLUE)
        ax.text(x, 8.85, textwrap.fill(what, 25), ha="center", va="top", fontsize=9.5, linespacing=1.25)
        if i:
            _arrow(ax, xs[i - 1] + 1.1, 9.45, x - 1.1, 9.45, _BLUE, width=2)

    # Bottom band: one micro-batch of k chunks on one stage.
    ax.plot([0.3, 14.7], [7.35, 7.35], color="#cccccc", linewidth=1)
    ax.text(0.3, 7.0, f"One micro-batch, k = {k} chunks, on one stage", fontsize=15, weight="bold", va="center")
    col = [4.2 + j * 2.75 for j in range(k)]
    y_f, y_c, y_r, y_b = 5.9, 4.35, 2.75, 1.2
    rows = [(y_f, "forward\n(chunk order)", _GREEN), (y_c, "K/V cache", _BLUE),
            (y_r, "relay slots\n(dK, dV)", _ORANGE), (y_b, "backward\n(reverse order)", _ORANGE)]
    for y, label, color in rows:
        ax.text(1.55, y, label, ha="center", va="center", fontsize=11.5, weight="bold", color=color)
    for j, x in enumerate(col):
        _box(ax, x, y_f, 1.7, 0.62, f"F  chunk {j}", _GREEN, size=11.5, weight="bold", fill=0.25)
        _box(ax, x, y_c, 1.7, 0.55, f"K{j}, V{j}  (detached)", _BLUE, size=10.5)
        _box(ax, x, y_b, 1.7, 0.62, f"B  chunk {j}", _ORANGE, size=11.5, weight="bold", fill=0.25)
        if j < k - 1:
            _box(ax, x, y_r, 1.7, 0.55, f"dK{j}, dV{j}  +=", _ORANGE, size=10.5)
        _arrow(ax, x - 0.25, y_f - 0.33, x - 0.25, y_c + 0.3, _GREEN, width=2)  # store own K/V
    ax.text(col[0] - 0.35, (y_f + y_c) / 2, "store", fontsize=9.5, color=_GREEN, ha="right", va="center")
    # Reads: chunk j's queries read every earlier chunk's K/V (as data: no graph link).
    for j in range(1, k):
        for i in range(j):
            _arrow(ax, col[i] + 0.45, y_c + 0.3, col[j] - 0.55, y_f - 0.33, _GREY, width=1.0, rad=-0.12, ls="--")
    ax.text(col[-1] + 1.05, (y_f + y_c) / 2, "- - - read by later\nchunks as data\n(no autograd link\nbetween chunks)",
            fontsize=9.5, color=_GREY, ha="left", va="center")
    # Backward: B(j) adds the gradient of earlier chunks' K/V into their relay slots ...
    for j in range(1, k):
        for i in range(j):
            _arrow(ax, col[j] - 0.55, y_b + 0.33, col[i] + 0.5, y_r - 0.3, _ORANGE, width=1.0, rad=0.12, ls="--")
    # ... and B(i), which runs later, takes its slot as part of its own K/V gradient.
    for i in range(k - 1):
        _arrow(ax, col[i] - 0.3, y_r - 0.3, col[i] - 0.3, y_b + 0.33, _ORANGE, width=2.4)
    ax.text(col[-1] + 1.05, y_r, "- - - each backward\nadds the gradient of\nearlier chunks' K/V\nto their slots;\n"
            "chunk i's backward\ntakes its slot (solid)", fontsize=9.5, color=_ORANGE, ha="left", va="center")
    order = ["1st", "2nd", "3rd", "4th", "5th", "6th", "7th", "8th"]
    for j, x in enumerate(col):
        ax.text(x + 0.9, y_f + 0.42, order[j], fontsize=9.5, color=_GREEN, ha="right", va="bottom")
        ax.text(x + 0.9, y_b - 0.42, order[k - 1 - j], fontsize=9.5, color=_ORANGE, ha="right", va="top")
    # Time order of the backwards, and where gradients go next.
    _arrow(ax, col[-1] + 0.2, 0.35, col[0] - 0.2, 0.35, _ORANGE, width=2)
    ax.text((col[0] + col[-1]) / 2, 0.12, "backwards run last chunk first: chunk j's K/V gradient is complete "
            "only after every later chunk's backward", ha="center", va="center", fontsize=10.5, color="#1a1a1a")
    _arrow(ax, col[0] - 0.9, y_b, 2.6, y_b - 0.55, _ORANGE, width=1.6)
    ax.text(2.45, y_b - 0.72, "to earlier layers\nand stage r-1", fontsize=9.5, ha="center", va="center", color=_ORANGE)
    _arrow(ax, 2.45, y_f + 0.55, col[0] - 0.9, y_f, _GREEN, width=1.6)
    ax.text(2.45, y_f + 0.72, "from stage r-1", fontsize=9.5, ha="center", va="bottom", color=_GREEN)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    print(draw_step(argv[0] if argv else DEFAULT_PATH))
    return 0


if __name__ == "__main__":
    sys.exit(main())
