"""One ``mas_eval`` run, typed: options -> benchmark, prompt builder, identity, results files.

The recipe loads the model and calls :func:`evaluate_model` once per adapter (once, or once per
step checkpoint in a sweep). For each mode it claims the predictions file for this run's
fingerprint (:func:`~mas.evaluation.identity.claim_predictions`), runs the benchmark through the
one loop, and writes ``results_<mode>.json`` and ``results_<mode>.md``. Results carry the run's
names (:class:`RunNames`) so tools pair the MAS and causal runs of one experiment.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional

from omegaconf import DictConfig, ListConfig

from mas.checkpointing import ADAPTER_WEIGHTS_FILE
from mas.config import ConfigError
from mas.evaluation.benchmarks import benchmark_modes, get_benchmark
from mas.evaluation.identity import (
    RunIdentity,
    adapter_identity,
    adapter_run_name,
    adapter_step,
    base_identity,
    claim_predictions,
    data_identity,
    experiment_name,
)
from mas.evaluation.loop import evaluate_benchmark
from mas.evaluation.options import EvalOptions
from mas.evaluation.results import markdown_table
from mas.evaluation.spec import Benchmark, BenchmarkContext, BenchmarkData
from mas.evaluation.user_tasks import BUILT_IN_BENCHMARKS, load_task_file, parse_user_tasks, register_user_tasks
from mas.generation import GenerationSettings, InferenceEngine
from mas.generation.loading import InferenceModel
from mas.generation.options import generation_settings
from mas.generation.settings import CACHE_LEN_MULTIPLE
from mas.segments import SegmentBuilder

__all__ = ["RunNames", "base_checkpoint_identity", "benchmark_data", "evaluate_model", "resolve_benchmark", "run_identity", "sweep_payload"]

log = logging.getLogger(__name__)


def benchmark_data(opts: EvalOptions) -> BenchmarkData:
    """Which data the benchmark reads, from the typed options."""
    return BenchmarkData(
        tasks=tuple(str(t) for t in opts.tasks) if opts.tasks else None,
        source=str(opts.data_dir) if opts.data_dir else None,
        split=opts.split,
        data_config=opts.data_config,
        limit=opts.limit,
        answer_template=opts.answer_template,
    )


def resolve_benchmark(opts: EvalOptions) -> Benchmark:
    """The benchmark to run: a built-in one, or the user's tasks (registered here).

    Raises:
        ConfigError: an unknown benchmark, a bad task declaration, or user tasks under a
            built-in benchmark name.
    """
    if opts.task_file is None and opts.user_tasks is None:
        return get_benchmark(opts.benchmark)
    tasks = []
    declared: Optional[str] = None
    if opts.task_file is not None:
        declared, tasks = load_task_file(opts.task_file)
    if opts.user_tasks is not None:
        tasks += parse_user_tasks(opts.user_tasks, "user_tasks")
    if opts.benchmark in BUILT_IN_BENCHMARKS:
        name = declared or (Path(opts.task_file).stem if opts.task_file else "my_tasks")
        raise ConfigError(f"task_file/user_tasks declare your own tasks: set benchmark={name} (a name of your own, not {opts.benchmark})")
    if declared is not None and declared != opts.benchmark:
        raise ConfigError(f"{opts.task_file} declares benchmark '{declared}' but the config says benchmark={opts.benchmark}; make them agree")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"task '{next(n for n in names if names.count(n) > 1)}' is declared in both task_file and user_tasks")
    return register_user_tasks(opts.benchmark, tasks)


def base_checkpoint_identity(checkpointer: DictConfig) -> Dict[str, Any]:
    """:func:`~mas.evaluation.identity.base_identity` of a checkpointer node, plus the node's
    own arguments (a tiny checkpointer's seed and pre-training steps change its weights)."""
    files = checkpointer["checkpoint_files"] if "checkpoint_files" in checkpointer else None
    names = [str(f) for f in files] if isinstance(files, (list, ListConfig)) else None
    arguments = {str(k): checkpointer[k] for k in checkpointer if k not in ("output_dir", "checkpoint_dir")}
    plain = {k: (list(v) if isinstance(v, ListConfig) else dict(v) if isinstance(v, DictConfig) else v) for k, v in arguments.items()}
    return {**base_identity(str(checkpointer.checkpoint_dir), names), "checkpointer": plain}


@dataclass(frozen=True)
class RunNames:
    """How results name a run.

    Attributes:
        run (str): the fine-tuning run's folder name (``base`` without an adapter).
        experiment (str): ``run`` without its ``mas``/``causal`` words: the key that pairs the
            MAS and causal runs of one experiment.
        step (Optional[int]): the adapter checkpoint's step.
        label (str): the table row label (``run_name`` when set).
    """

    run: str
    experiment: str
    step: Optional[int]
    label: str

    @classmethod
    def of(cls, opts: EvalOptions, loaded: InferenceModel) -> "RunNames":
        run = adapter_run_name(loaded.adapter_path)
        step = adapter_step(loaded.adapter_path)
        trained = loaded.trained_attention or "base"
        where = f"{run} step {step}" if step is not None else ("base model" if loaded.adapter_path is None else run)
        label = opts.run_name or f"{where} (trained {trained}, eval {opts.attention})"
        return cls(run, experiment_name(run), step, label)


def run_identity(opts: EvalOptions, benchmark: Benchmark, mode: str, loaded: InferenceModel, base: Mapping[str, Any]) -> RunIdentity:
    """The fingerprint of this run's predictions in ``mode`` (see :mod:`mas.evaluation.identity`)."""
    fields: Dict[str, Any] = {
        "recipe": "mas_eval",
        "base": dict(base),
        "adapter": adapter_identity(loaded.adapter_path, ADAPTER_WEIGHTS_FILE),
        "attention": opts.attention,
        "prompt_format": opts.prompt_format,
        "merge_system_and_user": opts.merge_system_and_user,
        "dtype": opts.dtype,
        "benchmark": benchmark.name,
        "benchmark_spec": dict(benchmark.identity),
        "data": data_identity(opts.data_dir, opts.split, opts.data_config) if not benchmark.identity else None,
        "mode": mode,
        "answer_template": opts.answer_template if mode == "loglik" else None,
    }
    if mode != "loglik":  # what a generation depends on
        fields["max_new_tokens"] = opts.max_new_tokens
        fields["max_cache_len"] = opts.max_cache_len
    return RunIdentity(fields)


def evaluate_model(
    opts: EvalOptions, benchmark: Benchmark, loaded: InferenceModel, tokenizer: Any, out_dir: Path, base: Mapping[str, Any]
) -> Dict[str, Dict[str, Any]]:
    """Evaluate one model (base + adapter) on ``benchmark`` in each asked-for mode.

    Writes, in ``out_dir``: ``predictions_<mode>.jsonl`` and its ``identity_<mode>.json``,
    ``results_<mode>.json``, ``results_<mode>.md``.

    Returns:
        Dict[str, Dict[str, Any]]: the results object per mode.

    Raises:
        ConfigError: a mode the benchmark lacks, or ``out_dir`` holding another run's predictions.
    """
    modes = benchmark_modes(benchmark, opts.mode)
    builder = SegmentBuilder(tokenizer, prompt_format=opts.prompt_format, merge_system_and_user=opts.merge_system_and_user)  # type: ignore[arg-type]
    settings = generation_settings(opts, rows=opts.batch_size)
    data = benchmark_data(opts)
    names = RunNames.of(opts, loaded)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: Dict[str, Dict[str, Any]] = {}
    for mode in modes:
        predictions = out_dir / f"predictions_{mode}.jsonl"
        identity = run_identity(opts, benchmark, mode, loaded, base)
        claim_predictions(predictions, identity, resume=opts.resume)
        context = BenchmarkContext(loaded.model, tokenizer, builder, settings, data, mode, predictions, opts.progress_bar)
        with _engine_for(mode, loaded, tokenizer, settings) as context.engine:
            results = evaluate_benchmark(benchmark, context)
            engine_counts = _prefix_cache_counts(context.engine)
        result = results.write_json(
            out_dir / f"results_{mode}.json",
            model=names.label,
            attention=opts.attention,
            mode=mode,
            limit=opts.limit,
            extra={
                "benchmark": benchmark.name,
                "trained_attention": loaded.trained_attention,
                "base": dict(base),  # folder, weight sizes and head hashes, checkpointer arguments
                "adapter": str(loaded.adapter_path) if loaded.adapter_path else None,
                "run": names.run,
                "experiment": names.experiment,
                "step": names.step,
                "run_name": names.label,
                "identity": identity.digest,
                "prefix_cache": engine_counts,
            },
        )
        table = markdown_table([(names.label, result)])
        (out_dir / f"results_{mode}.md").write_text(table + "\n")
        print(f"\n{benchmark.name} [{mode}] {names.label}\n{table}\nresults: {out_dir / f'results_{mode}.json'}")
        written[mode] = result
    return written


@contextlib.contextmanager
def _engine_for(mode: str, loaded: InferenceModel, tokenizer: Any, settings: GenerationSettings) -> Iterator[Optional[InferenceEngine]]:
    """One inference engine for every generating batch of a mode (log-likelihood scoring runs
    plain forwards: none), closed at the end so the model has no caches afterwards."""
    if mode == "loglik":
        yield None
        return
    engine = InferenceEngine(
        loaded.model,
        settings,
        tokenizer=tokenizer,
        pad_id=getattr(tokenizer, "pad_id", None) or 0,
        max_len=settings.max_cache_len or CACHE_LEN_MULTIPLE,  # grows to the longest batch when unset
    )
    try:
        yield engine
    finally:
        engine.close()


def _prefix_cache_counts(engine: Optional[InferenceEngine]) -> Optional[Dict[str, int]]:
    """What the prefix cache saved in this mode (the results' metadata)."""
    if engine is None or engine.prefix_cache is None:
        return None
    stats = engine.prefix_cache.stats
    return {"hits": stats.hits, "misses": stats.misses, "cached_prompt_tokens": stats.saved_tokens, "prefill_forwards": engine.prefill_forwards}


def sweep_payload(opts: EvalOptions, benchmark: Benchmark, loaded: InferenceModel, mode: str, points: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The ``sweep_<mode>.json`` object of a checkpoint sweep (read by ``tools/plot_sweep.py``)."""
    run = adapter_run_name(opts.adapter_checkpoint)
    return {
        "run": str(opts.adapter_checkpoint),
        "run_name": opts.run_name or run,
        "experiment": experiment_name(run),
        "trained_attention": loaded.trained_attention,
        "attention": opts.attention,
        "benchmark": benchmark.name,
        "mode": mode,
        "points": points,
    }
