"""Plot accuracy against training step for checkpoint sweeps (the paper's Fig. 3).

Each input is a ``sweep_<mode>.json`` that ``tune run mas_eval ... checkpoints=all`` wrote: the
run, its ``trained_attention``, the prompt ``attention``, and one point per step checkpoint with
its average and per-task scores. Every file becomes one line, labelled by how the run was
trained (e.g. one MAS and one causal fine-tune of the same model).

Usage::

    python tools/plot_sweep.py mas_eval_out/sweep_generate.json causal_eval_out/sweep_generate.json
    python tools/plot_sweep.py A/sweep_loglik.json B/sweep_loglik.json --per-task --out fig3.png
    python tools/plot_sweep.py A/sweep_generate.json --metric rougeL     # summarization sweeps

The y axis is the average over tasks (``average_accuracy``; for another ``--metric`` the mean of
the tasks' values), in percent; ``--per-task`` adds one panel per task.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from mas.errors import DataError, UserError  # noqa: E402

#: Inches per panel; a PNG is (columns * width, rows * height) * dpi pixels.
PANEL_SIZE = (5.0, 3.6)
MAX_COLUMNS = 4


def load_sweep(path: Path) -> Dict[str, Any]:
    """Read a sweep file and check its shape; points come back sorted by step.

    Raises:
        DataError: naming the file, for a missing file, a folder, invalid JSON or a malformed point.
    """
    if path.is_dir():
        found = sorted(p.name for p in path.glob("sweep_*.json"))
        raise DataError(f"{path} is a folder; give its sweep_<mode>.json" + (f" ({', '.join(found)} there)" if found else ""))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"sweep file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    points = data.get("points") if isinstance(data, dict) else None
    if not isinstance(points, list) or not points:
        raise DataError(f"{path}: not a sweep file (no 'points' list); write one with mas_eval checkpoints=all")
    for i, point in enumerate(points):
        if not isinstance(point, dict) or not isinstance(point.get("step"), int) or not isinstance(point.get("tasks"), dict):
            raise DataError(f"{path}, point {i}: needs an integer 'step' and a 'tasks' object")
    data["points"] = sorted(points, key=lambda p: p["step"])
    return data


def point_value(point: Dict[str, Any], metric: str, task: Optional[str] = None) -> Optional[float]:
    """A point's score in percent: one task's, or the average (None when missing)."""
    if task is not None:
        entry = point["tasks"].get(task)
        return None if entry is None or entry.get(metric) is None else 100.0 * entry[metric]
    if metric == "accuracy" and point.get("average_accuracy") is not None:
        return 100.0 * point["average_accuracy"]
    values = [e[metric] for e in point["tasks"].values() if e.get(metric) is not None]
    return 100.0 * sum(values) / len(values) if values else None


def run_label(data: Dict[str, Any], path: Path) -> str:
    """``"trained mas"``, plus the prompt mask when it differs (a cross-evaluation)."""
    trained = data.get("trained_attention") or "?"
    label = f"trained {trained}"
    if data.get("attention") and data.get("attention") != trained:
        label += f", eval {data['attention']}"
    return label


def plot(sweeps: Sequence[Tuple[str, Dict[str, Any]]], out: Path, *, metric: str = "accuracy",
         per_task: bool = False, title: Optional[str] = None, dpi: int = 100) -> Tuple[int, int]:
    """Draw the sweeps to ``out`` (PNG); returns the figure's (columns, rows) of panels."""
    tasks: List[str] = []
    for _, data in sweeps:
        for point in data["points"]:
            tasks += [t for t in point["tasks"] if t not in tasks]
    panels: List[Optional[str]] = [None] + (tasks if per_task else [])
    columns = min(len(panels), MAX_COLUMNS)
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * PANEL_SIZE[0], rows * PANEL_SIZE[1]), squeeze=False)
    for ax, task in zip(axes.flat, panels):
        for label, data in sweeps:
            steps, values = zip(*[(p["step"], point_value(p, metric, task)) for p in data["points"]])
            ax.plot(steps, [math.nan if v is None else v for v in values], marker="o", label=label)
        ax.set_title("Average over tasks" if task is None else task, fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{metric} (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    benchmark = sweeps[0][1].get("benchmark", "")
    mode = sweeps[0][1].get("mode", "")
    experiments = {data.get("experiment") for _, data in sweeps}
    named = f"{experiments.pop()}: " if len(experiments) == 1 and None not in experiments else ""
    fig.suptitle(title or f"{named}{benchmark} [{mode}]: {metric} during fine-tuning", fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return columns, rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweeps", nargs="+", type=Path, help="sweep_<mode>.json files, one line each")
    parser.add_argument("--labels", nargs="+", help="line labels (default: 'trained <attention>')")
    parser.add_argument("--metric", default="accuracy", help="per-task score to plot (accuracy; rougeL for summarization)")
    parser.add_argument("--per-task", action="store_true", help="one more panel per task")
    parser.add_argument("--title", help="figure title")
    parser.add_argument("--dpi", type=int, default=100, help="resolution (100)")
    parser.add_argument("--out", type=Path, default=Path("sweep.png"), help="PNG to write (sweep.png)")
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.sweeps):
        parser.error(f"{len(args.labels)} labels for {len(args.sweeps)} sweep files")
    try:
        data = [load_sweep(p) for p in args.sweeps]
    except UserError as e:  # anything else is a bug: its traceback stays
        print(f"plot_sweep: {e}", file=sys.stderr)
        return 2
    labels = args.labels or [run_label(d, p) for d, p in zip(data, args.sweeps)]
    if not args.labels and len(set(labels)) < len(labels):  # same training: tell runs apart by run name
        labels = [f"{label} ({d.get('run_name') or p.parent.name})" for label, d, p in zip(labels, data, args.sweeps)]
    columns, rows = plot(list(zip(labels, data)), args.out, metric=args.metric, per_task=args.per_task, title=args.title, dpi=args.dpi)
    print(f"wrote {args.out} ({columns}x{rows} panels, {len(data)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
