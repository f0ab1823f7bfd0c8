"""Print the paper's Table 1 for several evaluation runs, with a MAS-vs-causal win-rate row.

Usage::

    python tools/compare_results.py runs/llama1b_causal/results.json runs/llama1b_mas/results.json \\
        runs/llama3b_causal/results.json runs/llama3b_mas/results.json --out table.md

Each argument is a ``results.json`` written by :meth:`mas.evaluation.EvalResults.write_json`.
Rows follow the argument order; ``--labels`` names them (default: ``"<model> (<attention>)"``).

How runs are paired for the win-rate row: runs are grouped by the ``model`` and ``mode`` fields
they record; in a group, the run whose ``attention`` is ``--baseline`` (default ``causal``) is
paired with the run whose ``attention`` is ``--challenger`` (default ``mas``). A group with two
runs of the same attention is ambiguous and is an error; a run without a partner is listed under
the table and left out of the win rate. See :func:`mas.evaluation.win_rate_row` for the rate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from mas.data.rows import DataError
from mas.evaluation.results import load_results, markdown_table, win_rate_row

Results = Mapping[str, Any]


def default_label(path: Path, results: Results, show_mode: bool) -> str:
    """``"<model> (<attention>)"``, plus the mode when runs of several modes are compared."""
    model = results.get("model") or path.stem
    label = f"{model} ({results.get('attention', '?')})"
    return f"{label} [{results.get('mode')}]" if show_mode else label


def pair_runs(
    runs: Sequence[Tuple[str, Results]], baseline: str, challenger: str
) -> Tuple[List[Tuple[Results, Results]], List[str]]:
    """``(baseline, challenger)`` results per ``(model, mode)``, and the labels of unpaired runs.

    Raises:
        ValueError: two runs share model, mode and attention.
    """
    groups: Dict[Tuple[Any, Any], Dict[str, Tuple[str, Results]]] = {}
    unpaired: List[str] = []
    for label, results in runs:
        attention = results.get("attention")
        if attention not in (baseline, challenger) or not results.get("model"):
            unpaired.append(label)
            continue
        group = groups.setdefault((results["model"], results.get("mode")), {})
        if attention in group:
            raise ValueError(
                f"runs '{group[attention][0]}' and '{label}' are both {attention} runs of model "
                f"{results['model']!r} in mode {results.get('mode')!r}; compare them in separate calls"
            )
        group[attention] = (label, results)
    pairs = []
    for group in groups.values():
        if baseline in group and challenger in group:
            pairs.append((group[baseline][1], group[challenger][1]))
        else:
            unpaired.extend(label for label, _ in group.values())
    return pairs, unpaired


def build_report(paths: Sequence[Path], labels: Optional[Sequence[str]], baseline: str, challenger: str) -> str:
    """The Markdown table (with the win-rate row when a pair exists) and notes on pairing."""
    loaded = [(path, load_results(path)) for path in paths]
    show_mode = len({results.get("mode") for _, results in loaded}) > 1
    names = list(labels) if labels else [default_label(p, r, show_mode) for p, r in loaded]
    runs = [(name, results) for name, (_, results) in zip(names, loaded)]
    pairs, unpaired = pair_runs(runs, baseline, challenger)
    lines = [markdown_table(runs)]
    if pairs:
        lines.append(win_rate_row(pairs, label=f"{challenger} > {baseline} (win rate)"))
    lines.append("")
    lines.append(
        f"Win rate: {len(pairs)} {baseline}/{challenger} pair(s) matched by model and mode; "
        "task cells count models where the challenger is strictly better, Avg. counts all (model, task) cells."
    )
    if unpaired:
        lines.append(f"Not in the win rate (no partner run): {', '.join(unpaired)}.")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="results.json files, one per run (table row)")
    parser.add_argument("--labels", nargs="+", help="row labels, one per results file")
    parser.add_argument("--baseline", default="causal", help="attention of the baseline runs (default: causal)")
    parser.add_argument("--challenger", default="mas", help="attention of the challenger runs (default: mas)")
    parser.add_argument("--out", type=Path, help="also write the Markdown to this file")
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.results):
        parser.error(f"--labels has {len(args.labels)} names for {len(args.results)} results files")
    try:
        report = build_report(args.results, args.labels, args.baseline, args.challenger)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
