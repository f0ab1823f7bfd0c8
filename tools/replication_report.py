"""Statistics, tables and plots of the miniature replication (``tools/replicate.py``).

Everything here reads what the study's runs wrote (``mas_eval``'s ``sweep_loglik.json`` and
``results_loglik.json``) and nothing else. The statistics are the ones ``docs/replication.md``
fixes before the runs: mean ± sample standard deviation over seeds with every per-seed number,
and for each hypothesis the per-seed paired difference with its mean, a 95% confidence interval
(Student's t) and an exact two-sided sign test (ties dropped). No outcome is judged here: the
report prints what was measured.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

__all__ = ["CROSSINGS", "HYPOTHESES", "PREDICTED_SIGN", "decide", "paired_statistics", "plot_curves", "report_markdown", "sign_test_p", "summarize"]

#: (trained, evaluated) attention of the four train/eval crossings (the paper's Table 3).
CROSSINGS: Tuple[Tuple[str, str], ...] = (("mas", "mas"), ("causal", "causal"), ("mas", "causal"), ("causal", "mas"))

#: Hypothesis name -> (what it compares, minuend crossing, subtrahend crossing).
HYPOTHESES: Dict[str, Tuple[str, Tuple[str, str], Tuple[str, str]]] = {
    "H1": ("MAS->MAS minus causal->causal (MAS fine-tuning vs the causal baseline)", ("mas", "mas"), ("causal", "causal")),
    "H2": ("MAS->causal minus MAS->MAS (a MAS-trained adapter prompted causally)", ("mas", "causal"), ("mas", "mas")),
    "H2b": ("causal->MAS minus causal->causal (a causal-trained adapter prompted with MAS)", ("causal", "mas"), ("causal", "causal")),
}
#: The predicted sign of each hypothesis' difference (docs/replication.md).
PREDICTED_SIGN = {"H1": 1, "H2": -1, "H2b": -1}

# Two-sided 95% quantiles of Student's t by degrees of freedom (1-30); the normal's beyond.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided sign-test p-value of ``wins`` against ``losses`` (ties already dropped)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_statistics(differences: Sequence[float]) -> Dict[str, Any]:
    """Mean, sample std, 95% t interval and sign test of per-seed paired differences (points)."""
    n = len(differences)
    mean = statistics.fmean(differences) if n else float("nan")
    sd = statistics.stdev(differences) if n > 1 else float("nan")
    half = _T975[min(n - 1, len(_T975)) - 1] * sd / math.sqrt(n) if n > 1 else float("nan")
    wins, losses = sum(d > 0 for d in differences), sum(d < 0 for d in differences)
    return {
        "n": n, "mean": mean, "sd": sd, "ci95": [mean - half, mean + half], "wins": wins, "losses": losses,
        "ties": n - wins - losses, "sign_test_p": sign_test_p(wins, losses), "differences": list(differences),
    }  # fmt: skip


def decide(name: str, test: Mapping[str, Any]) -> str:
    """The protocol's decision rule: ``supported`` when the 95% interval lies entirely on the
    predicted side of 0, ``contradicted`` when entirely on the other side, else ``not decided``."""
    low, high = test["ci95"]
    if test["n"] < 2 or math.isnan(low):
        return "not decided"
    sign = PREDICTED_SIGN[name]
    if (sign > 0 and low > 0) or (sign < 0 and high < 0):
        return "supported"
    if (sign > 0 and high < 0) or (sign < 0 and low > 0):
        return "contradicted"
    return "not decided"


def _mean_sd(values: Sequence[float]) -> Dict[str, Any]:
    return {
        "n": len(values),
        "mean": statistics.fmean(values) if values else float("nan"),
        "sd": statistics.stdev(values) if len(values) > 1 else float("nan"),
        "values": list(values),
    }


def summarize(records: Sequence[Mapping[str, Any]], base: Sequence[Mapping[str, Any]], seeds: Sequence[int], steps: Mapping[str, Sequence[int]]) -> Dict[str, Any]:
    """Per task: each crossing's accuracy per step over seeds, the hypotheses' paired
    differences per step, and the base model under both masks.

    Args:
        records: one per (task, seed, trained, evaluated, step) with ``accuracy`` in percent.
        base: one per (task, evaluated) with ``accuracy`` in percent (no adapter).
        seeds: the seeds in the study's order (per-seed numbers are listed in it).
        steps: the chosen steps per task.
    """
    table = {(r["task"], r["seed"], r["trained"], r["evaluated"], r["step"]): r["accuracy"] for r in records}
    out: Dict[str, Any] = {}
    for task, task_steps in steps.items():
        crossings = {}
        for trained, evaluated in CROSSINGS:
            per_step = {}
            for step in task_steps:
                values = [table[(task, s, trained, evaluated, step)] for s in seeds if (task, s, trained, evaluated, step) in table]
                per_step[str(step)] = {**_mean_sd(values), "seeds": [s for s in seeds if (task, s, trained, evaluated, step) in table]}
            crossings[f"{trained}->{evaluated}"] = per_step
        hypotheses = {}
        for name, (_, plus, minus) in HYPOTHESES.items():
            per_step = {}
            for step in task_steps:
                both = [s for s in seeds if (task, s, *plus, step) in table and (task, s, *minus, step) in table]
                diffs = [table[(task, s, *plus, step)] - table[(task, s, *minus, step)] for s in both]
                per_step[str(step)] = {**paired_statistics(diffs), "seeds": both}
            hypotheses[name] = per_step
        base_acc = {b["evaluated"]: b["accuracy"] for b in base if b["task"] == task}
        out[task] = {"steps": list(task_steps), "crossings": crossings, "hypotheses": hypotheses, "base": base_acc}
    return out


def _fmt(x: float, digits: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _signed(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:+.1f}"


def report_markdown(summary: Mapping[str, Any], study: Mapping[str, Any], *, complete: bool) -> str:
    """The results section: the primary tests with the protocol's decision rule, then per task
    the crossings' accuracy table, the hypotheses' paired differences, and every per-seed number."""
    seeds = study["seeds"]
    lines = [
        "## Results",
        "",
        f"Generated by `tools/replicate.py` from the runs under `{study['out']}` (study `{study['name']}`); "
        "accuracy is log-likelihood accuracy (%) on the held-out rows; mean ± sample std over seeds.",
        "",
    ]
    if not complete:
        lines += ["**Partial study**: not every pre-registered run has finished; the numbers below cover the runs that have.", ""]
    lines += [
        "### Primary tests", "",
        "Decision rule of the protocol: supported when the 95% interval of the mean paired difference lies entirely on the "
        "predicted side of 0, contradicted when entirely on the other side, otherwise not decided.", "",
        "| test | predicted | mean difference [95% CI] | wins/losses/ties | sign-test p | decision |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]  # fmt: skip
    for name, task, step in study["primary"]:
        test = summary.get(task, {}).get("hypotheses", {}).get(name, {}).get(str(step))
        if test is None:
            lines.append(f"| {name} on {task} at step {step} | | not run | | | |")
            continue
        ci = test["ci95"]
        predicted = "> 0" if PREDICTED_SIGN[name] > 0 else "< 0"
        lines.append(
            f"| {name} on {task} at step {step} | {predicted} | {_signed(test['mean'])} [{_signed(ci[0])}, {_signed(ci[1])}] "
            f"| {test['wins']}/{test['losses']}/{test['ties']} | {_fmt(test['sign_test_p'], 4)} | {decide(name, test)} |"
        )
    lines.append("")
    for task, data in summary.items():
        steps = data["steps"]
        lines += [f"### Task `{task}`", ""]
        base = data["base"]
        lines += [f"Base model (no adapter): {_fmt(base.get('mas', float('nan')))}% with MAS, {_fmt(base.get('causal', float('nan')))}% causal.", ""]
        lines += ["| train -> eval | " + " | ".join(f"step {s}" for s in steps) + " |", "| --- |" + " ---: |" * len(steps)]
        for crossing, per_step in data["crossings"].items():
            cells = [f"{_fmt(c['mean'])} ± {_fmt(c['sd'])} (n={c['n']})" for c in (per_step[str(s)] for s in steps)]
            lines.append(f"| {crossing} | " + " | ".join(cells) + " |")
        lines += ["", "Paired differences per seed (points): mean [95% CI], wins/losses/ties, sign-test p.", ""]
        lines += ["| hypothesis | " + " | ".join(f"step {s}" for s in steps) + " |", "| --- |" + " ---: |" * len(steps)]
        for name, per_step in data["hypotheses"].items():
            cells = []
            for s in steps:
                h = per_step[str(s)]
                ci = h["ci95"]
                cells.append(f"{_signed(h['mean'])} [{_signed(ci[0])}, {_signed(ci[1])}], {h['wins']}/{h['losses']}/{h['ties']}, p={_fmt(h['sign_test_p'], 3)}")
            lines.append(f"| {name}: {HYPOTHESES[name][0]} | " + " | ".join(cells) + " |")
        lines += ["", "Every per-seed number (accuracy %):", ""]
        header = ["crossing", "step"] + [str(s) for s in seeds]
        lines += ["| " + " | ".join(header) + " |", "| --- | ---: |" + " ---: |" * len(seeds)]
        for crossing, per_step in data["crossings"].items():
            for s in steps:
                cell = per_step[str(s)]
                by_seed = dict(zip(cell["seeds"], cell["values"]))
                lines.append(f"| {crossing} | {s} | " + " | ".join(_fmt(by_seed[x]) if x in by_seed else "–" for x in seeds) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot_curves(summary: Mapping[str, Any], path: Path, title: Optional[str] = None) -> Path:
    """Accuracy against step for each crossing (mean ± std over seeds), one panel per task, with
    the base model under both masks as dashed lines: the paper's Fig. 3 in miniature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 3.8), squeeze=False)
    styles = {"mas->mas": ("#dd8452", "-"), "causal->causal": ("#4c72b0", "-"), "mas->causal": ("#dd8452", ":"), "causal->mas": ("#4c72b0", ":")}
    for ax, task in zip(axes[0], tasks):
        data = summary[task]
        for crossing, per_step in data["crossings"].items():
            points = [(int(s), c["mean"], c["sd"]) for s, c in per_step.items() if c["n"]]
            if not points:
                continue
            xs, ys, sds = zip(*points)
            colour, dash = styles[crossing]
            ax.errorbar(xs, ys, yerr=[0 if math.isnan(v) else v for v in sds], color=colour, linestyle=dash, marker="o", capsize=3, label=f"trained {crossing.replace('->', ', eval ')}")
        for mode, acc in data["base"].items():
            ax.axhline(acc, color="#999999", linestyle="--" if mode == "mas" else "-.", linewidth=1, label=f"base model, eval {mode}")
        ax.set_xscale("log", base=2)  # the chosen steps double
        ax.set_xticks(data["steps"], [str(s) for s in data["steps"]])
        ax.minorticks_off()
        ax.set_title(task)
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("held-out accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json(path: Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON (atomically: a killed study never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, allow_nan=True) + "\n")
    tmp.replace(path)
