"""Draw a ``[s, s]`` attention mask as the paper's Fig. 1 does (``tools/draw_mask.py``, ``tools/attention_maps.py``).

Rows are queries, columns keys; an allowed cell is coloured by the segment kind of its key
(system prompt, user prompt, answer), cells a mask opens beyond the causal one are hatched, and
segment boundaries are drawn as lines.
"""

from __future__ import annotations

from typing import List

import numpy as np
from matplotlib import pyplot as plt
from matplotlib.colors import ListedColormap

__all__ = ["MASK_KIND_COLOURS", "MASK_KIND_NAMES", "MASKED_COLOUR", "draw_mask_panel"]

#: Colour of a masked cell, then one colour per segment kind (0 system, 1 user, 2 answer).
MASKED_COLOUR = "#f2f2f2"
MASK_KIND_COLOURS = ["#4c72b0", "#55a868", "#dd8452"]
MASK_KIND_NAMES = ["system prompt", "user prompt", "answer (causal)"]


def draw_mask_panel(ax, allowed: np.ndarray, kinds: List[int], title: str, opened: np.ndarray) -> None:
    """Draw one mask on ``ax``.

    Args:
        ax: a matplotlib ``Axes``.
        allowed (np.ndarray): bool ``[s, s]``, query by key.
        kinds (List[int]): ``[s]`` segment kind of each position (0 system, 1 user, 2 answer).
        title (str): panel title.
        opened (np.ndarray): bool ``[s, s]``, cells to hatch (allowed beyond the causal mask).
    """
    seq_len = allowed.shape[0]
    # 0 = masked, 1 + kind of the key otherwise.
    cells = np.where(allowed, 1 + np.asarray(kinds)[None, :], 0)
    cmap = ListedColormap([MASKED_COLOUR] + MASK_KIND_COLOURS)
    ax.imshow(cells, cmap=cmap, vmin=0, vmax=len(MASK_KIND_COLOURS), interpolation="nearest")
    # Grid between cells.
    ax.set_xticks(np.arange(-0.5, seq_len, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, seq_len, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.8)
    ax.tick_params(which="minor", length=0)
    # Cells MAS opens beyond the causal mask.
    for q, k in zip(*np.nonzero(opened)):
        ax.add_patch(
            plt.Rectangle((k - 0.5, q - 0.5), 1, 1, fill=False, hatch="///", edgecolor="white", lw=0)
        )
    # Segment boundaries.
    boundaries = [i for i in range(1, seq_len) if kinds[i] != kinds[i - 1]]
    for boundary in boundaries:
        ax.axhline(boundary - 0.5, color="black", linewidth=1.5)
        ax.axvline(boundary - 0.5, color="black", linewidth=1.5)
    # Segment names above the columns.
    starts = [0] + boundaries
    ends = boundaries + [seq_len]
    for start, end in zip(starts, ends):
        name = MASK_KIND_NAMES[kinds[start]].split(" (")[0]
        ax.text((start + end - 1) / 2, -0.8, name, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(seq_len))
    ax.set_yticks(range(seq_len))
    ax.tick_params(labelsize=7)
    ax.set_xlabel("key position (attended to)")
    ax.set_ylabel("query position (attending)")
    ax.set_title(title, pad=16)
