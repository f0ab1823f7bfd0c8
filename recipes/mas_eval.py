"""Evaluate a (MAS or causal) fine-tuned model on the paper's benchmarks.

    tune run mas_eval --config tiny_eval [key=value ...]
    tune run mas_eval --config tiny_eval adapter_checkpoint=/tmp/mas_runs/tiny_mas attention=causal
    tune run mas_eval --config tiny_eval adapter_checkpoint=/tmp/mas_runs/tiny_mas checkpoints=all

``attention`` sets the prompt mask independently of how the model was trained, so the paper's
Table 3 cross-evaluation is two config keys. ``checkpoints: all`` evaluates every step
checkpoint of a run (the paper's Fig. 3; plot with ``tools/plot_sweep.py``). Outputs, in
``output_dir``: ``predictions_<mode>.jsonl`` (per example; an interrupted run resumes from it),
``results_<mode>.json`` and ``results_<mode>.md`` (the paper's table layout).
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

from omegaconf import DictConfig, OmegaConf

from mas.checkpointing import RECIPE_STATE_FILE, hf_info_from_checkpointer, load_peft_adapter, peft_to_adapter
from mas.config import ConfigError, RecipeKeys, instantiate, parse, run_reporting_user_errors
from mas.devices import resolve_device
from mas.evaluation import markdown_table
from mas.evaluation.benchmarks import BENCHMARKS, BenchmarkContext
from mas.generation import GenerationSettings
from mas.generation.loading import (
    INFERENCE_KEYS_OPTIONAL,
    INFERENCE_KEYS_REQUIRED,
    InferenceModel,
    load_inference_model,
    prompt_mismatch_warnings,
)
from mas.segments import SegmentBuilder
from mas.training import load_adapter_state

log = logging.getLogger("mas_eval")

KEYS = RecipeKeys(
    recipe="mas_eval",
    required={
        **INFERENCE_KEYS_REQUIRED,
        "output_dir": "where predictions and results go",
        "benchmark": "commonsense | mmlu | summarization",
    },
    optional={
        **INFERENCE_KEYS_OPTIONAL,
        "checkpoints": "latest | all (evaluate every step checkpoint of adapter_checkpoint)",
        "run_name": "row label in the results table",
        "tasks": "commonsense tasks, MMLU subjects or summarization data sets (null: all)",
        "data_dir": "benchmark data: folder, file or hub id",
        "split": "hub split / file name (default test)",
        "data_config": "hub dataset config (e.g. all for cais/mmlu, 3.0.0 for cnn_dailymail)",
        "limit": "first N examples per task",
        "mode": "generate | loglik | both",
        "answer_template": "loglik answer sentence with {label}",
        "progress_bar": "show progress",
        "resume": "reuse predictions already written",
    },
)


def _modes(cfg: DictConfig) -> List[str]:
    mode = cfg.get("mode", "generate")
    if mode not in ("generate", "loglik", "both"):
        raise ConfigError(f"mode must be generate, loglik or both, got {mode!r}")
    return ["generate", "loglik"] if mode == "both" else [mode]


def _checkpoint_folders(cfg: DictConfig) -> List[Optional[Path]]:
    """The adapters to evaluate: none, the given/latest one, or every step checkpoint of a run."""
    adapter = cfg.get("adapter_checkpoint")
    which = cfg.get("checkpoints", "latest")
    if which not in ("latest", "all"):
        raise ConfigError(f"checkpoints must be latest or all, got {which!r}")
    if which == "latest":
        return [Path(adapter) if adapter else None]
    if not adapter:
        raise ConfigError("checkpoints=all needs adapter_checkpoint=<a fine-tuning run's output_dir>")
    folders = sorted(p for p in (Path(adapter) / "checkpoints").glob("step_*") if (p / RECIPE_STATE_FILE).exists())
    if not folders:
        raise ConfigError(f"no complete checkpoint under {adapter}/checkpoints")
    return folders


def _run_name(cfg: DictConfig, loaded: InferenceModel) -> str:
    if cfg.get("run_name"):
        return str(cfg.run_name)
    trained = loaded.trained_attention or "base"
    return f"{loaded.adapter_path.parent.parent.name if loaded.adapter_path else 'base model'} (trained {trained}, eval {cfg.attention})"


def evaluate_once(cfg: DictConfig, loaded: InferenceModel, tokenizer: Any, out_dir: Path) -> Dict[str, Dict[str, Any]]:
    """Run the configured benchmark in each mode; write predictions, results JSON and table."""
    settings = GenerationSettings(
        attention=cfg.attention,
        max_new_tokens=int(cfg.get("max_new_tokens", 32)),
        batch_size=int(cfg.get("batch_size", 16)),
        reuse_system_cache=bool(cfg.get("reuse_system_cache", True)),
        compile_decode=bool(cfg.get("compile_decode", False)),
        max_cache_len=cfg.get("max_cache_len"),
        attention_backend=cfg.get("attention_backend", "auto"),
        seed=cfg.get("seed"),
    )
    builder = SegmentBuilder(
        tokenizer,
        prompt_format=cfg.get("prompt_format", "text"),
        merge_system_and_user=bool(cfg.get("merge_system_and_user", False)),
    )
    if settings.reuse_system_cache and builder.merge_system_and_user:
        settings.reuse_system_cache = False  # the merged segment is not reusable
    benchmark = cfg.benchmark
    if benchmark not in BENCHMARKS:
        raise ConfigError(f"benchmark must be one of {sorted(BENCHMARKS)}, got {benchmark!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for mode in _modes(cfg):
        predictions = out_dir / f"predictions_{mode}.jsonl"
        if predictions.exists() and not cfg.get("resume", True):
            predictions.unlink()
        context = BenchmarkContext(
            model=loaded.model,
            tokenizer=tokenizer,
            builder=builder,
            settings=settings,
            cfg=cfg,
            mode=mode,
            predictions_path=predictions,
            progress=bool(cfg.get("progress_bar", True)),
        )
        results = BENCHMARKS[benchmark](context)
        name = _run_name(cfg, loaded)
        data = results.write_json(
            out_dir / f"results_{mode}.json",
            model=name,
            attention=cfg.attention,
            mode=mode,
            limit=cfg.get("limit"),
            config=cfg.get("config_name"),
            extra={
                "benchmark": benchmark,
                "trained_attention": loaded.trained_attention,
                "adapter": str(loaded.adapter_path) if loaded.adapter_path else None,
            },
        )
        table = markdown_table([(name, data)])
        (out_dir / f"results_{mode}.md").write_text(table + "\n")
        print(f"\n{benchmark} [{mode}] {name}\n{table}\nresults: {out_dir / f'results_{mode}.json'}")
        written[mode] = data
    return written


def run(cfg: DictConfig) -> Dict[str, Any]:
    from torchtune import training

    device = resolve_device(cfg.get("device", "auto"))
    dtype = training.get_dtype(cfg.get("dtype", "fp32"), device=device)
    folders = _checkpoint_folders(cfg)
    _modes(cfg)
    tokenizer = instantiate(cfg.tokenizer)
    loaded = load_inference_model(
        cfg.model,
        cfg.checkpointer,
        adapter_checkpoint=str(folders[0]) if folders[0] else None,
        device=device,
        dtype=dtype,
        attention_backend=cfg.get("attention_backend", "auto"),
    )
    for note in prompt_mismatch_warnings(
        loaded, cfg.attention, cfg.get("prompt_format", "text"), bool(cfg.get("merge_system_and_user", False))
    ):
        log.warning(note)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml")
    if cfg.get("checkpoints", "latest") == "latest":
        return evaluate_once(cfg, loaded, tokenizer, out)
    # A checkpoint sweep: same base weights, one adapter after another.
    info = hf_info_from_checkpointer(instantiate(cfg.checkpointer))
    sweep: Dict[str, List[Dict[str, Any]]] = {}
    for folder in folders:
        weights, adapter_config = load_peft_adapter(folder)
        load_adapter_state(loaded.model, {k: v.to(dtype) for k, v in peft_to_adapter(weights, info).items()})
        loaded = InferenceModel(loaded.model, adapter_config, folder)
        state = json.loads(json.dumps({"step": int(folder.name.split("_")[1])}))
        for mode, data in evaluate_once(cfg, loaded, tokenizer, out / folder.name).items():
            sweep.setdefault(mode, []).append({**state, "average_accuracy": data["average_accuracy"], "tasks": data["tasks"]})
    for mode, points in sweep.items():
        payload = {
            "run": str(cfg.adapter_checkpoint),
            "trained_attention": loaded.trained_attention,
            "attention": cfg.attention,
            "benchmark": cfg.benchmark,
            "mode": mode,
            "points": points,
        }
        (out / f"sweep_{mode}.json").write_text(json.dumps(payload, indent=2) + "\n")
        print(f"sweep written to {out / f'sweep_{mode}.json'} ({len(points)} checkpoints)")
    return sweep


@parse(KEYS)
def recipe_main(cfg: DictConfig) -> int:
    return run_reporting_user_errors(KEYS.recipe, run, cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
