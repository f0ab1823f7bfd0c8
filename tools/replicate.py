"""A miniature, pre-registered replication of the paper's effects, end to end on a CPU (issue 23).

Usage::

    python tools/replicate.py                       # the study of docs/replication.md (make replicate)
    python tools/replicate.py --ci --out /tmp/ci    # 2 seeds, a few dozen steps: the mechanics only
    python tools/replicate.py --plan                # list the runs and exit
    python tools/replicate.py --seeds 100           # only these of the study's seeds (sizing; partial)

What it runs, with the project's public commands only (``tools/pretrain_tiny_base.py``, ``tune run
mas_lora_finetune``, ``tune run mas_eval``; ``--in-process`` calls the same recipes' entry points
in this process instead of ``tune run``, which saves their start-up of several seconds per run: on
the CI-sized study both wrote bitwise-identical adapters and the same accuracies):

1. the synthetic rows (``tools/replication_tasks.py``), drawn from a fixed seed, splits asserted
   disjoint, and a ``mas_eval`` task file scoring them by log-likelihood over yes/no;
2. the format-only base: the 2-layer, 64-dim tiny Llama pre-trained causally on the tasks' rows
   with every answer replaced at random (``--random-answers yes no``);
3. per task and seed, a MAS and a causal LoRA fine-tune (the bundled ``tiny_mas``/``tiny_causal``,
   LoRA r8 on q and v, differing only in ``attention``), keeping a checkpoint at each chosen step
   (``save_at_steps``);
4. each adapter evaluated with both prompt masks at the chosen steps (``checkpoints=[...]``): the
   four train/eval crossings; and the base model under both masks;
5. the report: ``results/per_run.jsonl`` (every accuracy), ``results/summary.json`` and
   ``results/summary.md``, ``results/learning_curves.png`` and ``replication_results.md``
   (``--docs`` also copies the last two into ``docs/``).

Each run prints one progress line. A killed study continues where it stopped: a run whose output
marker exists (the last chosen checkpoint, the sweep file, the base's recipe file) is skipped; a
fine-tune killed midway resumes from its last checkpoint; an evaluation resumes from its
predictions. The study's settings are written to ``study.json``: another study's folder is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

from replication_report import plot_curves, report_markdown, summarize, write_json
from replication_study import BENCHMARK, CI, FULL, Layout, Study, StudyError, claim_folder, collect, study_record
from replication_tasks import make_splits, task_file_text, write_jsonl

REPO = Path(__file__).resolve().parents[1]
#: The report's place in the docs (``--docs``) and its plot beside it.
DOCS_REPORT = REPO / "docs" / "replication_results.md"


@dataclass
class Run:
    """One step of the study: a name, whether its output marker says it finished, how to run it."""

    name: str
    done: Callable[[], bool]
    action: Callable[[], None]


# ----------------------------------------------------------------------------------- commands
def _slug(name: str) -> str:
    """A run's name as a file name (``eval membership seed 100 trained mas, eval causal`` ->
    ``eval_membership_seed_100_trained_mas_eval_causal``)."""
    return "_".join(name.replace(",", "").split())


class Runner:
    """Runs the project's public commands: ``tune run`` subprocesses, or the recipes' entry
    points in this process (``in_process``); each run's output goes to ``logs/<run_name>.log``.

    Each run gets ``threads`` CPU threads (``OMP_NUM_THREADS``): the tiny model gains nothing
    from a second thread, and on a busy machine two threads that wait for each other made a step
    50x slower (1 s instead of 20 ms, measured); ``--jobs 2`` uses two cores by running two
    fine-tunes at once instead.
    """

    def __init__(self, out: Path, in_process: bool, threads: int = 1) -> None:
        self.out = out
        self.in_process = in_process
        self.threads = threads
        if in_process:
            import torch

            torch.set_num_threads(threads)

    def _subprocess(self, name: str, cmd: List[str]) -> None:
        log = self.out / "logs" / f"{_slug(name)}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads)}
        with log.open("w") as handle:
            code = subprocess.run(cmd, cwd=self.out, stdout=handle, stderr=subprocess.STDOUT, env=env).returncode
        if code != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            raise StudyError(f"{name} failed (exit {code}): {tail[0]} (full log: {log})")

    def recipe(self, name: str, recipe: str, config: str, overrides: List[str]) -> None:
        """``tune run <recipe> --config <config> <overrides>``."""
        if not self.in_process:
            beside = Path(sys.executable).parent / "tune"  # an unactivated venv has it here, not on PATH
            tune = str(beside) if beside.exists() else shutil.which("tune") or "tune"
            self._subprocess(name, [tune, "run", recipe, "--config", config, *overrides])
            return
        import importlib

        from mas.config import load_config
        from mas.errors import UserError

        module = importlib.import_module(recipe)
        try:
            with self._logged(name):
                module.run(load_config(config, overrides))
        except UserError as e:  # as `tune run` would print it; a bug keeps its traceback
            raise StudyError(f"{name} failed: {e}") from None

    @contextlib.contextmanager
    def _logged(self, name: str) -> Iterator[None]:
        """Send an in-process run's printed output to its log, as a subprocess's goes."""
        log = self.out / "logs" / f"{_slug(name)}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
            yield

    def tool(self, name: str, script: str, args: List[str]) -> None:
        """``python tools/<script> <args>``."""
        if not self.in_process:
            self._subprocess(name, [sys.executable, str(REPO / "tools" / script), *args])
            return
        import importlib

        with self._logged(name):
            code = importlib.import_module(Path(script).stem).main(args)
        if code:
            raise StudyError(f"{name} failed (exit {code})")


# ----------------------------------------------------------------------------------- the plan
def base_overrides(layout: Layout) -> List[str]:
    """The overrides that make every recipe load the study's base (as pretrain_tiny_base prints)."""
    from mas.models.pretrain_base import CHECKPOINTER_OVERRIDES

    return [o.format(dir=layout.base) for o in CHECKPOINTER_OVERRIDES]


def _yaml_list(items: Sequence[Any]) -> str:
    return "[" + ",".join(str(i) for i in items) + "]"


def write_data(study: Study, layout: Layout) -> None:
    """The rows of every task, the base's format-only rows and the task file."""
    pretrain = []
    for task in study.tasks:
        splits = make_splits(
            task, seed=study.data_seed, train_rows=study.batch_size * study.steps[task][-1],
            pretrain_rows=study.pretrain_rows, test_rows=study.test_rows,
        )  # fmt: skip
        write_jsonl(layout.train_rows(task), splits.train)
        write_jsonl(layout.data / task / "test.jsonl", splits.test)
        pretrain += splits.pretrain
    write_jsonl(layout.data / "pretrain.jsonl", pretrain)
    tmp = layout.task_file.with_name("tasks.yaml.tmp")
    tmp.write_text(task_file_text(BENCHMARK, [(t, f"{t}/test.jsonl") for t in study.tasks]))
    tmp.replace(layout.task_file)  # the marker: written last


def _finetune_done(run_dir: Path, steps: Sequence[int]) -> bool:
    from mas.checkpointing import step_checkpoints

    return set(steps) <= set(step_checkpoints(run_dir))


def finetune(runner: Runner, study: Study, layout: Layout, task: str, seed: int, attention: str, name: str) -> None:
    """One LoRA fine-tune; a run killed midway resumes from its last checkpoint."""
    from mas.checkpointing import latest_checkpoint

    run_dir = layout.finetune(task, seed, attention)
    steps = study.steps[task]
    if latest_checkpoint(run_dir) is not None:
        again = ["resume_from_checkpoint=True"]
    else:  # never started, or killed before its first checkpoint: start over
        again = ["overwrite_output_dir=True"] if run_dir.exists() else []
    overrides = [
        *base_overrides(layout), f"output_dir={run_dir}", f"dataset.source={layout.train_rows(task)}", "dataset.rows=null",
        "~val_dataset", "val_every_n_steps=null", f"batch_size={study.batch_size}", "epochs=1", f"max_steps_per_epoch={steps[-1]}",
        "save_every_n_steps=null", f"save_at_steps={_yaml_list(steps)}", "keep_last_n_checkpoints=1", "save_merged_weights=False",
        "log_every_n_steps=5", "progress_bar=False", f"seed={seed}", *again,
    ]  # fmt: skip
    runner.recipe(name, "mas_lora_finetune", f"tiny_{attention}", overrides)


def evaluate(runner: Runner, layout: Layout, name: str, evaluated: str, out: Path, adapter: Optional[Path], steps: Optional[Sequence[int]], tasks: Sequence[str]) -> None:
    """``mas_eval`` of an adapter at chosen steps (or of the base model) on the study's task file."""
    overrides = [
        *base_overrides(layout), f"attention={evaluated}", f"output_dir={out}", f"task_file={layout.task_file}",
        f"benchmark={BENCHMARK}", f"tasks={_yaml_list(tasks)}", "mode=loglik", "progress_bar=False",
        f"adapter_checkpoint={adapter if adapter else 'null'}",
    ]  # fmt: skip
    if steps:
        overrides.append(f"checkpoints={_yaml_list(steps)}")
    runner.recipe(name, "mas_eval", "tiny_eval", overrides)


def plan(study: Study, layout: Layout, runner: Runner, seeds: Sequence[int]) -> List[List[Run]]:
    """Every run of the study as chains: the first (data, base, the base model's evaluations)
    runs before all others; each other chain (a fine-tune, then its two evaluations) needs only
    the first, so chains may run side by side."""
    runs = [
        Run("data", layout.task_file.exists, lambda: write_data(study, layout)),
        Run(
            "base", (layout.base / "base_recipe.json").exists,
            lambda: runner.tool("base", "pretrain_tiny_base.py", [
                str(layout.data / "pretrain.jsonl"), str(layout.base), "--steps", str(study.pretrain_steps),
                "--seed", str(study.base_seed), "--random-answers", "yes", "no",
            ]),
        ),
    ]  # fmt: skip
    for evaluated in ("mas", "causal"):
        out = layout.base_evaluation(evaluated)
        name = f"eval base model, eval {evaluated}"
        runs.append(Run(name, (out / "results_loglik.json").exists, lambda n=name, e=evaluated, o=out: evaluate(runner, layout, n, e, o, None, None, study.tasks)))
    chains = [runs]
    for task in study.tasks:
        for seed in seeds:
            for trained in ("mas", "causal"):
                run_dir = layout.finetune(task, seed, trained)
                name = f"finetune {task} seed {seed} {trained}"
                done = functools.partial(_finetune_done, run_dir, study.steps[task])
                chain = [Run(name, done, lambda n=name, t=task, s=seed, a=trained: finetune(runner, study, layout, t, s, a, n))]
                for evaluated in ("mas", "causal"):
                    out = layout.evaluation(task, seed, trained, evaluated)
                    name = f"eval {task} seed {seed} trained {trained}, eval {evaluated}"
                    chain.append(Run(
                        name, (out / "sweep_loglik.json").exists,
                        lambda n=name, t=task, e=evaluated, o=out, r=run_dir: evaluate(runner, layout, n, e, o, r, study.steps[t], [t]),
                    ))  # fmt: skip
                chains.append(chain)
    return chains


# ----------------------------------------------------------------------------------- results
def write_report(study: Study, layout: Layout, seeds: Sequence[int], docs: bool) -> Path:
    """Per-run results, the summary (JSON and Markdown), the plot and the report."""
    records, base, complete = collect(study, layout, seeds)
    results = layout.out / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "per_run.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records + [{"base": True, **b} for b in base]))
    summary = summarize(records, base, list(seeds), {t: study.steps[t] for t in study.tasks})
    description = {**study_record(study), "out": str(layout.out), "seeds_run": list(seeds), "complete": complete}
    write_json(results / "summary.json", {"study": description, "tasks": summary})
    markdown = report_markdown(summary, {**description, "seeds": list(seeds)}, complete=complete)
    (results / "summary.md").write_text(markdown)
    plot = plot_curves(summary, results / "learning_curves.png", title=f"study {study.name}: mean ± std over {len(seeds)} seed(s)")
    figure = "![Learning curves](replication_curves.png)" if docs else "![Learning curves](results/learning_curves.png)"
    protocol = "replication.md" if docs else str(REPO / "docs" / "replication.md")
    report = (
        "# Miniature replication: results\n\n"
        f"The runs of the protocol in [replication.md]({protocol}), as measured; do not edit by hand.\n\n{figure}\n\n" + markdown
    )
    (layout.out / "replication_results.md").write_text(report)
    if docs:
        DOCS_REPORT.write_text(report)
        shutil.copyfile(plot, DOCS_REPORT.with_name("replication_curves.png"))
    return layout.out / "replication_results.md"


# ----------------------------------------------------------------------------------- main
class _Progress:
    """One line per run, numbered in plan order, safe from several threads."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.started = time.perf_counter()
        self.lock = threading.Lock()

    def line(self, index: int, run: Run, text: str) -> None:
        with self.lock:
            print(f"[{index}/{self.total}] {run.name}: {text} (study {time.perf_counter() - self.started:.0f} s)", flush=True)


def _run_chain(chain: List[Tuple[int, Run]], progress: _Progress, stopping: threading.Event) -> None:
    for index, run in chain:
        if stopping.is_set():  # another chain failed, or Ctrl-C: start nothing new
            return
        if run.done():
            progress.line(index, run, "done before, skipped")
            continue
        begun = time.perf_counter()
        run.action()
        progress.line(index, run, f"done in {time.perf_counter() - begun:.0f} s")


def run_study(
    study: Study, out: Path, *, seeds: Sequence[int], in_process: bool, docs: bool, jobs: int = 1, threads: int = 1, print_plan: bool = False
) -> Path:
    """Run (or continue) ``study`` in ``out`` and write its report; returns the report's path.

    Args:
        study (Study): the study's fixed parameters.
        out (Path): its folder.
        seeds (Sequence[int]): the seeds to run (all of the study's, or some for sizing).
        in_process (bool): call the recipes' entry points here instead of ``tune run``.
        docs (bool): also write the report into ``docs/``.
        jobs (int): fine-tune chains run side by side (``tune run`` subprocesses only).
        threads (int): CPU threads per run.
        print_plan (bool): list the runs and return.

    Raises:
        StudyError: another study's folder, an unknown seed, or a run that failed.
    """
    unknown = sorted(set(seeds) - set(study.seeds))
    if unknown:
        raise StudyError(f"--seeds: {unknown[0]} is not one of the study's seeds {list(study.seeds)}")
    if in_process and jobs > 1:
        raise StudyError("--jobs > 1 runs `tune run` subprocesses side by side; it cannot be combined with --in-process")
    layout = Layout(out)
    numbered: List[List[Tuple[int, Run]]] = []
    index = 0
    for chain in plan(study, layout, Runner(out, in_process, threads), seeds):
        numbered.append([(index := index + 1, run) for run in chain])
    if print_plan:
        for chain in numbered:
            for i, run in chain:
                print(f"[{i}/{index}] {run.name}")
        return out
    claim_folder(study, out)
    progress = _Progress(index)
    stopping = threading.Event()
    _run_chain(numbered[0], progress, stopping)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(_run_chain, chain, progress, stopping) for chain in numbered[1:]]
        try:
            for future in futures:
                future.result()
        except BaseException:  # a failed run or Ctrl-C: the running ones end, no new one starts
            stopping.set()
            pool.shutdown(cancel_futures=True)
            raise
    report = write_report(study, layout, seeds, docs)
    print(f"report: {report} (tables: {out / 'results'}/summary.md, plot: {out / 'results'}/learning_curves.png)")
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="the study's folder (default /tmp/mas_runs/replication, or .../replication_ci with --ci)")
    parser.add_argument("--ci", action="store_true", help="the CI-sized study: 2 seeds, a few steps; tests the mechanics only")
    parser.add_argument("--seeds", nargs="+", type=int, help="run only these of the study's seeds (sizing; the report says it is partial)")
    parser.add_argument("--in-process", action="store_true", help="call the recipes' entry points here instead of `tune run`")
    parser.add_argument("--jobs", type=int, default=1, help="fine-tunes (with their evaluations) run side by side (default 1; 2 on an idle 2-core machine)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run (default 1)")
    parser.add_argument("--docs", action="store_true", help="also write docs/replication_results.md and its plot")
    parser.add_argument("--plan", action="store_true", help="list the runs and exit")
    args = parser.parse_args(argv)
    study = CI if args.ci else FULL
    out = (args.out or Path("/tmp/mas_runs") / ("replication_ci" if args.ci else "replication")).expanduser().resolve()
    if args.docs and args.ci:
        parser.error("--docs writes the pre-registered study's report; the CI-sized study's numbers mean nothing")
    try:
        run_study(
            study, out, seeds=args.seeds or study.seeds, in_process=args.in_process, docs=args.docs,
            jobs=args.jobs, threads=args.threads, print_plan=args.plan,
        )  # fmt: skip
    except StudyError as e:
        print(f"replicate: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"replicate: interrupted; the same command continues the study in {out}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
