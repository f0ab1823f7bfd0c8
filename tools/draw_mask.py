"""Draw the causal mask and the MAS mask side by side (the paper's Fig. 1, on a toy prompt).

The MAS picture is :func:`mas.dense_mas_mask` itself, so the figure shows what the code does.
Allowed cells are coloured by the segment of the key they attend, cells that MAS opens on top
of the causal mask are hatched, and segment boundaries are drawn as lines.

Usage::

    python tools/draw_mask.py --out docs/mas_mask.png   # the README figure (default: ./mas_mask.png)
    python tools/draw_mask.py --system 3 --user 8 --answer 4 --out /tmp/mask.png
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Tuple

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from mas import dense_mas_mask  # noqa: E402
from mas.testing import segment_row  # noqa: E402
from mas.testing.drawing import MASK_KIND_COLOURS, MASK_KIND_NAMES, MASKED_COLOUR, draw_mask_panel  # noqa: E402

#: In the working directory: the tracked docs/mas_mask.png is rewritten only when named (--out docs/mas_mask.png).
DEFAULT_OUT = Path("mas_mask.png")

def example_segments(system_len: int, user_len: int, answer_len: int) -> Tuple[torch.Tensor, List[int]]:
    """A one-row layout: system segment (id 0), user segment (id 1), answer (``CAUSAL``).

    Returns:
        Tuple[torch.Tensor, List[int]]: segment ids ``[1, s]`` and the segment kind of every
        position (0 system, 1 user, 2 answer), ``[s]``.
    """
    kinds = [0] * system_len + [1] * user_len + [2] * answer_len
    return torch.tensor([segment_row(system_len, user_len, answer_len)]), kinds


def draw(system_len: int, user_len: int, answer_len: int, out: Path, dpi: int = 90) -> Path:
    """Render the two masks to ``out`` (PNG).

    Args:
        system_len (int): system prompt tokens.
        user_len (int): user prompt tokens.
        answer_len (int): answer tokens.
        out (Path): file to write.
        dpi (int): resolution.

    Returns:
        Path: ``out``.
    """
    segment_ids, kinds = example_segments(system_len, user_len, answer_len)
    seq_len = segment_ids.shape[1]
    causal = np.tril(np.ones((seq_len, seq_len), dtype=bool))
    mas = dense_mas_mask(segment_ids)[0].numpy()

    fig, axes = plt.subplots(1, 2, figsize=(10, 5.8))
    draw_mask_panel(axes[0], causal, kinds, "Causal mask", np.zeros_like(causal))
    draw_mask_panel(axes[1], mas, kinds, "MAS mask (prompt segments bidirectional)", mas & ~causal)
    legend = [Patch(color=c, label=f"key in {n}") for c, n in zip(MASK_KIND_COLOURS, MASK_KIND_NAMES)]
    legend.append(Patch(facecolor=MASKED_COLOUR, edgecolor="grey", label="masked"))
    legend.append(Patch(facecolor="grey", hatch="///", edgecolor="white", label="opened by MAS"))
    fig.legend(
        handles=legend, loc="lower center", ncol=5, fontsize=8, frameon=False,
        bbox_to_anchor=(0.5, 0.0),
    )
    fig.suptitle(
        f"System prompt {system_len} tokens, user prompt {user_len}, answer {answer_len}; "
        "row = query, coloured cell = a key it may attend",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, pil_kwargs={"optimize": True})
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--system", type=int, default=4, help="system prompt tokens (4)")
    parser.add_argument("--user", type=int, default=6, help="user prompt tokens (6)")
    parser.add_argument("--answer", type=int, default=5, help="answer tokens (5)")
    parser.add_argument("--dpi", type=int, default=90, help="resolution (90)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"PNG to write ({DEFAULT_OUT})")
    args = parser.parse_args()
    out = draw(args.system, args.user, args.answer, args.out, dpi=args.dpi)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
