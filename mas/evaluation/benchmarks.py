"""The one registry of benchmarks ``mas_eval`` can run, by name.

==================  ===========================================  ==========================
name                module                                       modes
==================  ===========================================  ==========================
``commonsense``     :mod:`mas.evaluation.commonsense` (Table 1)  generate, loglik
``mmlu``            :mod:`mas.evaluation.mmlu` (Table 4)         generate, loglik
``summarization``   :mod:`mas.evaluation.summarization` (Tab. 5) generate
a user's own        :mod:`mas.evaluation.user_tasks`             generate, loglik, exact
==================  ===========================================  ==========================

Each module registers its :class:`~mas.evaluation.spec.Benchmark` when it is imported; the
package ``mas.evaluation`` imports them all, so the registry is complete once it is imported.
User tasks are registered by ``mas_eval`` from the config or a task file.
"""

from __future__ import annotations

from typing import Dict, List, Optional

from mas.config import ConfigError, suggest
from mas.evaluation.spec import Benchmark
from mas.evaluation.suites import DEFAULT_BENCHMARK, TaskSuite

__all__ = ["BENCHMARKS", "MODE_CHOICES", "benchmark_modes", "get_benchmark", "get_suite", "register_benchmark"]

BENCHMARKS: Dict[str, Benchmark] = {}

#: ``mode`` values of ``mas_eval``: one mode, both of the paper's, or every mode of the benchmark.
MODE_CHOICES = ("generate", "loglik", "exact", "both", "all")


def register_benchmark(benchmark: Benchmark, *, replace: bool = False) -> Benchmark:
    """Add ``benchmark`` to the registry.

    Args:
        benchmark (Benchmark): the spec.
        replace (bool): allow replacing a benchmark of the same name (user tasks, re-declared).

    Raises:
        ConfigError: the name is taken (a user task named like a built-in benchmark).
    """
    if benchmark.name in BENCHMARKS and not replace:
        raise ConfigError(f"a benchmark named '{benchmark.name}' already exists; give your tasks another benchmark name")
    BENCHMARKS[benchmark.name] = benchmark
    return benchmark


def get_benchmark(name: str) -> Benchmark:
    """The registered benchmark ``name``.

    Raises:
        ConfigError: an unknown name, with the closest one and the known ones.
    """
    if name not in BENCHMARKS:
        raise ConfigError(
            f"benchmark must be one of {sorted(BENCHMARKS)}, got {name!r}{suggest(name, BENCHMARKS)}; "
            "your own tasks: task_file=<tasks.yaml> or user_tasks (docs/own_task.md)"
        )
    return BENCHMARKS[name]


def get_suite(name: Optional[str]) -> TaskSuite:
    """The suite of benchmark ``name`` (None: commonsense).

    Raises:
        ValueError: an unknown benchmark.
    """
    name = name or DEFAULT_BENCHMARK
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}")
    return BENCHMARKS[name].suite


def benchmark_modes(benchmark: Benchmark, mode: str) -> List[str]:
    """The modes a ``mode`` value asks of ``benchmark`` (``both``: generate and loglik; ``all``:
    every mode it has).

    Raises:
        ConfigError: a mode the benchmark does not have, naming the ones it has.
    """
    if mode not in MODE_CHOICES:
        raise ConfigError(f"mode must be one of {', '.join(MODE_CHOICES)}, got {mode!r}")
    wanted = list(benchmark.modes) if mode == "all" else ["generate", "loglik"] if mode == "both" else [mode]
    missing = [m for m in wanted if m not in benchmark.modes]
    if missing:
        has = list(benchmark.modes)
        note = f" ({benchmark.mode_note})" if benchmark.mode_note else ""
        raise ConfigError(
            f"benchmark {benchmark.name} has no {'/'.join(missing)} mode{note}; "
            f"set mode={has[0] if len(has) == 1 else 'all'} (its modes: {', '.join(has)})"
        )
    return wanted
