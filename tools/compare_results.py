"""Print a results table for several evaluation runs, with a MAS-vs-causal win-rate row.

Usage::

    python tools/compare_results.py runs/eval_causal/results_generate.json runs/eval_mas/results_generate.json \\
        runs/llama3b_causal/results_generate.json runs/llama3b_mas/results_generate.json --out table.md

Each argument is a ``results_<mode>.json`` written by ``mas_eval`` (any benchmark, your own tasks
included). Rows follow the argument order; ``--labels`` names them (default: the ``run_name``
the run recorded, e.g. ``tiny_mas step 36 (trained mas, eval mas)``).

How runs are paired for the win-rate row: by what the results record, never by folder names.
Runs are grouped by the base model they ran on (the ``base`` record of ``mas_eval``: its weights
files' sizes and head hashes, so a copied base folder is the same base), benchmark and mode.
Files written before results recorded their base are grouped by their recorded ``experiment``
(or ``model``), with a note saying so. Evaluations of a base model without an adapter are never
paired: nothing was fine-tuned, so its two prompt masks are no MAS-vs-causal comparison (they are
listed under the table).
In a group, the run trained and evaluated with ``--baseline`` attention (default ``causal``) is
paired with the one trained and evaluated with ``--challenger`` (default ``mas``); with several
runs per side (checkpoints), runs of the same step are paired. Cross-evaluations (trained one
way, evaluated the other) and runs without a partner are listed under the table and left out of
the win rate; two runs of one side and step in a group that has both sides (two MAS fine-tunes
of one base, say) are ambiguous and an error: compare them in separate calls. See
:func:`mas.evaluation.win_rate_row` for the rate.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from mas.errors import DataError, UserError
from mas.evaluation.results import load_results, markdown_table, win_rate_row

Results = Dict[str, Any]
Run = Tuple[str, Results]


def default_label(path: Path, results: Results, show_mode: bool) -> str:
    """The recorded ``run_name`` (older files: ``"<model> (<attention>)"``), plus the mode when
    runs of several modes are compared."""
    if results.get("run_name"):
        label = str(results["run_name"])
    else:
        label = f"{results.get('model') or path.stem} ({results.get('attention', '?')})"
    return f"{label} [{results.get('mode')}]" if show_mode else label


def side_of(results: Results) -> Optional[str]:
    """The attention a run was trained *and* evaluated with; None for a cross-evaluation."""
    trained, evaluated = results.get("trained_attention"), results.get("attention")
    return evaluated if trained in (None, evaluated) else None


def is_base_model(results: Results) -> bool:
    """Whether a run evaluated a base model without an adapter (``adapter: null`` recorded; older
    files without that record: run ``base`` with no trained attention)."""
    if "adapter" in results:
        return not results["adapter"]
    return results.get("run") == "base" and results.get("trained_attention") is None


def _base_weights(results: Results) -> Optional[str]:
    """The recorded base by content (weights files' sizes and head hashes), or None."""
    base = results.get("base")
    weights = base.get("weights") if isinstance(base, dict) else None
    if not isinstance(weights, dict) or not weights:
        return None
    return json.dumps(sorted(list(v) if isinstance(v, (list, tuple)) else [v] for v in weights.values()))


def _group_key(results: Results) -> Tuple[str, Any, Any, Any]:
    weights = _base_weights(results)
    if weights is not None:
        return ("adapters on base", weights, results.get("benchmark"), results.get("mode"))
    if results.get("experiment"):
        return ("experiment", results["experiment"], results.get("benchmark"), results.get("mode"))
    return ("model", results.get("model"), results.get("benchmark"), results.get("mode"))


def _group_name(kind: str, name: Any, members: Sequence[Run]) -> str:
    if kind == "adapters on base":
        return f"{kind} {members[0][1]['base'].get('folder', '?')}"
    return f"{kind} {name!r}"


def pair_runs(
    runs: Sequence[Run], baseline: str, challenger: str
) -> Tuple[List[Tuple[Results, Results]], List[str], List[str], List[str]]:
    """``(baseline, challenger)`` results per experiment (and step), the labels of unpaired runs,
    of cross-evaluations and of base-model evaluations (never paired).

    Raises:
        DataError: two runs of one side and step in a group that has both sides.
    """
    groups: Dict[Tuple[str, Any, Any, Any], Dict[str, List[Run]]] = {}
    unpaired: List[str] = []
    crossed: List[str] = []
    base_models: List[str] = []
    for label, results in runs:
        if is_base_model(results):
            base_models.append(label)
            continue
        side = side_of(results)
        if side is None:
            crossed.append(label)
            continue
        key = _group_key(results)
        if side not in (baseline, challenger) or not key[1]:
            unpaired.append(label)
            continue
        groups.setdefault(key, {baseline: [], challenger: []})[side].append((label, results))
    pairs = []
    for (kind, name, _, mode), group in groups.items():
        base_runs, challenger_runs = group[baseline], group[challenger]
        if len(base_runs) == 1 and len(challenger_runs) == 1:
            pairs.append((base_runs[0][1], challenger_runs[0][1]))
            continue
        by_step: Dict[Any, Dict[str, List[Run]]] = {}
        for side, members in group.items():
            for run in members:
                by_step.setdefault(run[1].get("step"), {baseline: [], challenger: []})[side].append(run)
        for step_runs in by_step.values():
            b, c = step_runs[baseline], step_runs[challenger]
            if b and c and (len(b) > 1 or len(c) > 1):
                side = baseline if len(b) > 1 else challenger
                first, second = (b if len(b) > 1 else c)[:2]
                raise DataError(
                    f"runs '{first[0]}' and '{second[0]}' are both {side} runs of {_group_name(kind, name, b + c)} "
                    f"in mode {mode!r}; compare them in separate calls"
                )
            if b and c:
                pairs.append((b[0][1], c[0][1]))
            else:
                unpaired.extend(label for label, _ in b + c)
    return pairs, unpaired, crossed, base_models


def build_report(paths: Sequence[Path], labels: Optional[Sequence[str]], baseline: str, challenger: str) -> str:
    """The Markdown table (with the win-rate row when a pair exists) and notes on pairing."""
    loaded = [(path, load_results(path)) for path in paths]
    show_mode = len({results.get("mode") for _, results in loaded}) > 1
    names = list(labels) if labels else [default_label(p, r, show_mode) for p, r in loaded]
    runs = [(name, results) for name, (_, results) in zip(names, loaded)]
    pairs, unpaired, crossed, base_models = pair_runs(runs, baseline, challenger)
    lines = [markdown_table(runs)]
    if pairs:
        lines.append(win_rate_row(pairs, label=f"{challenger} > {baseline} (win rate)"))
    lines.append("")
    unrecorded = [name for name, results in runs if _base_weights(results) is None and name not in base_models]
    lines.append(
        f"Win rate: {len(pairs)} {baseline}/{challenger} pair(s) matched by recorded base model, benchmark and mode; "
        "task cells count models where the challenger is strictly better, Avg. counts all (model, task) cells."
    )
    if unrecorded:
        lines.append(f"Paired by recorded experiment name instead (results without a recorded base): {', '.join(unrecorded)}.")
    if unpaired:
        lines.append(f"Not in the win rate (no partner run): {', '.join(unpaired)}.")
    if crossed:
        lines.append(f"Not in the win rate (cross-evaluations, trained and evaluated differently): {', '.join(crossed)}.")
    if base_models:
        lines.append(f"Not in the win rate (base model without an adapter: nothing fine-tuned to compare): {', '.join(base_models)}.")
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
    except UserError as e:  # anything else is a bug: its traceback stays
        print(f"compare_results: {e}", file=sys.stderr)
        return 2
    print(report, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
