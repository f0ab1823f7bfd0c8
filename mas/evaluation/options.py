"""The keys of ``mas_eval``: each with its type, default and reason, declared once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Literal, Optional, Union

from mas.config import ConfigError, option
from mas.generation.options import InferenceOptions

__all__ = ["EvalOptions"]


@dataclass(kw_only=True)
class EvalOptions(InferenceOptions):
    """Keys of ``mas_eval`` (``tune run mas_eval --help`` prints them)."""

    output_dir: str = option(help="where predictions and results go")
    benchmark: str = option("commonsense", "commonsense | mmlu | summarization | the name of your own tasks (task_file, user_tasks)")
    task_file: Optional[str] = option(None, "a YAML file declaring your own tasks (docs/own_task.md)")
    user_tasks: Optional[List[Any]] = option(None, "your own tasks declared inline, as in a task file's tasks list")
    checkpoints: Union[Literal["latest", "all"], List[int]] = option(
        "latest", "latest | all (every step checkpoint of adapter_checkpoint: Fig. 3) | a list of steps, e.g. [250,500,1000]"
    )
    run_name: Optional[str] = option(None, "row label in the results table (null: from the adapter path)")
    tasks: Optional[List[str]] = option(None, "tasks, MMLU subjects or summarization sets (null: all of the benchmark)")
    data_dir: Optional[str] = option(None, "benchmark data: folder, file or hub id (null: the bundled sample)")
    split: Optional[str] = option(None, "hub split / file name (null: test)")
    data_config: Optional[str] = option(None, "hub dataset config (e.g. all for cais/mmlu, 3.0.0 for cnn_dailymail)")
    limit: Optional[int] = option(None, "first N examples per task (null: all)", min=1)
    mode: Literal["generate", "loglik", "exact", "both", "all"] = option(
        "generate", "generate (the paper's protocol) | loglik | exact | both (generate and loglik) | all (every mode of the benchmark)"
    )
    answer_template: Optional[str] = option(None, "loglik answer sentence with {label} (null: the benchmark's)")
    max_new_tokens: int = option(32, "tokens to generate per question", min=1)
    batch_size: int = option(16, "questions per batch", min=1)
    progress_bar: bool = option(True, "show progress: a bar on a terminal, a plain line every 10 s in a log or pipe")
    resume: bool = option(True, "reuse predictions already written by the same model and settings")

    def check(self) -> None:
        """Rules across keys."""
        super().check()
        if isinstance(self.checkpoints, list) and (not self.checkpoints or min(self.checkpoints) < 1):
            raise ConfigError(f"checkpoints: a list of steps must name at least one step >= 1, got {self.checkpoints}")
