"""Plot training curves of fine-tuning runs (loss and validation loss against step).

Each input is a run's ``output_dir`` (or its ``metrics.jsonl``), e.g. a MAS and a causal run of
the same config; every run becomes one line, labelled by its folder name (or ``--labels``).

Usage::

    python tools/plot_metrics.py /tmp/mas_runs/tiny_mas /tmp/mas_runs/tiny_causal --out curves.png
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Optional

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from mas.training import read_metrics  # noqa: E402


def metrics_path(run: Path) -> Path:
    path = run / "metrics.jsonl" if run.is_dir() else run
    if not path.exists():
        raise SystemExit(f"no metrics.jsonl at {path}")
    return path


def plot(runs: List[Path], labels: List[str], out: Path, dpi: int = 100) -> Path:
    """Two panels: training loss and validation loss per step, one line per run."""
    fig, (train_ax, val_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    for run, label in zip(runs, labels):
        path = metrics_path(run)
        train = read_metrics(path, kind="train")
        val = read_metrics(path, kind="val")
        train_ax.plot([r["step"] for r in train], [r["loss"] for r in train], label=label, linewidth=1.2)
        if val:
            val_ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], marker="o", label=label)
    for ax, title in ((train_ax, "training loss"), (val_ax, "validation loss")):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="run folders (output_dir) or metrics.jsonl files")
    parser.add_argument("--labels", nargs="+", default=None)
    parser.add_argument("--out", type=Path, default=Path("training_curves.png"))
    parser.add_argument("--dpi", type=int, default=100)
    args = parser.parse_args(argv)
    labels = args.labels or [r.name if r.is_dir() else r.parent.name for r in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit("give one label per run")
    print(f"wrote {plot(args.runs, labels, args.out, args.dpi)}")


if __name__ == "__main__":
    main()
