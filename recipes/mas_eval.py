"""Evaluate a (MAS or causal) fine-tuned model on the paper's benchmarks or on your own tasks.

    tune run mas_eval --config tiny_eval [key=value ...]
    tune run mas_eval --config tiny_eval adapter_checkpoint=/tmp/mas_runs/tiny_mas attention=causal
    tune run mas_eval --config tiny_eval adapter_checkpoint=/tmp/mas_runs/tiny_mas checkpoints=all
    tune run mas_eval --config tiny_eval adapter_checkpoint=/tmp/mas_runs/tiny_mas checkpoints=[50,100]
    tune run mas_eval --config tiny_eval task_file=my_tasks.yaml benchmark=my_tasks mode=all

``attention`` sets the prompt mask independently of how the model was trained, so the paper's
Table 3 cross-evaluation is two config keys. ``checkpoints: all`` evaluates every step
checkpoint of a run (the paper's Fig. 3; plot with ``tools/plot_sweep.py``), each into its own
``step_N`` folder; ``checkpoints: [250, 500]`` evaluates those steps only. Outputs, in
``output_dir``: ``predictions_<mode>.jsonl`` (per example; an
interrupted run resumes from it, and only a run with the same fingerprint, ``identity_<mode>.json``,
may), ``results_<mode>.json`` and ``results_<mode>.md`` (the paper's table layout).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import mas

if getattr(mas, "__file__", None) is None:  # a plain folder named "mas" in the working directory
    sys.exit(f"a folder named 'mas' in {list(mas.__path__)} shadows the installed mas package; run from another directory")

from omegaconf import DictConfig

from mas.checkpointing import step_checkpoints
from mas.config import ConfigError, parse, resolved_yaml, run_reporting_user_errors, to_options
from mas.evaluation.benchmarks import benchmark_modes
from mas.evaluation.options import EvalOptions
from mas.evaluation.identity import check_eval_output_dir
from mas.evaluation.run import base_checkpoint_identity, evaluate_model, resolve_benchmark, sweep_payload
from mas.generation.loading import InferenceModel, load_for_inference
from mas.generation.options import prompt_settings, with_prompt_settings
from mas.model_weights import load_adapter

log = logging.getLogger("mas_eval")
RECIPE = "mas_eval"


def _checkpoint_folders(opts: EvalOptions) -> List[Optional[Path]]:
    """The adapters to evaluate: none, the given/latest one, every step checkpoint of a run, or
    the step checkpoints it names (``checkpoints=[250,500]``)."""
    adapter = opts.adapter_checkpoint
    if opts.checkpoints == "latest":
        return [Path(adapter) if adapter else None]
    chosen = "all" if opts.checkpoints == "all" else "[" + ",".join(str(s) for s in opts.checkpoints) + "]"
    if not adapter:
        raise ConfigError(f"checkpoints={chosen} needs adapter_checkpoint=<a fine-tuning run's output_dir>")
    by_step = step_checkpoints(adapter)
    if not by_step:
        raise ConfigError(f"no complete checkpoint under {adapter}/checkpoints")
    if opts.checkpoints == "all":
        return list(by_step.values())
    for step in opts.checkpoints:
        if step not in by_step:
            raise ConfigError(
                f"checkpoints: step {step} has no complete checkpoint under {adapter}/checkpoints "
                f"(steps there: {', '.join(str(s) for s in by_step)})"
            )
    return [by_step[step] for step in sorted(set(opts.checkpoints))]


def run(cfg: DictConfig) -> Dict[str, Any]:
    """Evaluate as ``cfg`` says; returns the results per mode (a sweep: the points per mode)."""
    opts = to_options(cfg, EvalOptions, RECIPE)
    benchmark = resolve_benchmark(opts)
    modes = benchmark_modes(benchmark, opts.mode)
    folders = _checkpoint_folders(opts)
    out = Path(opts.output_dir)
    check_eval_output_dir(out)  # a user's file under a name this run writes survives
    out.mkdir(parents=True, exist_ok=True)  # an unwritable folder fails before the model loads
    setup = load_for_inference(opts, adapter_checkpoint=str(folders[0]) if folders[0] else None)
    tokenizer, loaded = setup.tokenizer, setup.loaded
    chosen = prompt_settings((loaded.adapter_config or {}).get("mas"), opts)
    for note in chosen.mismatches + chosen.notes:
        log.warning(note)
    opts = with_prompt_settings(opts, chosen)
    base = base_checkpoint_identity(opts.checkpointer)
    (out / "config.yaml").write_text(resolved_yaml(cfg, EvalOptions))
    if opts.checkpoints == "latest":
        return evaluate_model(opts, benchmark, loaded, tokenizer, out, base)
    # A checkpoint sweep: same base weights, one adapter after another, each in its own folder
    # (and so with its own fingerprint), each checked against the base it was trained on.
    sweep: Dict[str, List[Dict[str, Any]]] = {mode: [] for mode in modes}
    for folder in folders:
        adapter = load_adapter(loaded.model, folder, loaded.base, model_cfg=opts.model, allow_other_base=opts.allow_other_base)
        loaded = InferenceModel(loaded.model, adapter.config, adapter.path, loaded.base)
        for mode, data in evaluate_model(opts, benchmark, loaded, tokenizer, out / folder.name, base).items():
            point = {"step": int(folder.name.split("_")[1]), "average_accuracy": data["average_accuracy"], "tasks": data["tasks"]}
            sweep[mode].append(point)
    for mode, points in sweep.items():
        payload = sweep_payload(opts, benchmark, loaded, mode, points)
        (out / f"sweep_{mode}.json").write_text(json.dumps(payload, indent=2) + "\n")
        print(f"sweep written to {out / f'sweep_{mode}.json'} ({len(points)} checkpoints)")
    return sweep


@parse(RECIPE, EvalOptions)
def recipe_main(cfg: DictConfig) -> int:
    return run_reporting_user_errors(
        RECIPE, run, cfg, on_interrupt="the same command resumes from the predictions written so far (resume=True)"
    )


if __name__ == "__main__":
    sys.exit(recipe_main())
