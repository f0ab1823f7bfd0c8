"""The recipes' command line: ``--config NAME_OR_PATH [key=value ...]``, ``--help``, one-line errors.

Every recipe and tool reports a user error the same way: ``recipe: what is wrong (key or
file:row), and how to fix it`` on stderr, exit code 2, no traceback. ``MAS_DEBUG=1`` (or the
``--debug`` flag) shows the traceback too. Anything that is not a user error is a bug and keeps
its traceback.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Type

from omegaconf import DictConfig

from mas.config._bundled import KIND_RECIPES, bundled_experiments, parse_experiment_name
from mas.config._load import load_config, to_options
from mas.config._options import describe_type, option_infos
from mas.errors import ConfigError, UserError

__all__ = ["EXIT_INTERRUPTED", "EXIT_USER_ERROR", "format_help", "instantiate", "parse", "report_user_errors", "run_reporting_user_errors"]

#: Exit code of a run stopped by a user error (argparse's convention).
EXIT_USER_ERROR = 2


def _debug() -> bool:
    return os.environ.get("MAS_DEBUG", "") not in ("", "0")


def report_user_errors(recipe: str, run: Callable[[], Any]) -> Any:
    """Run ``run()``; a user error ends the process with one line on stderr and exit code 2.

    User errors: :class:`mas.errors.UserError` (config, data) and ``OSError`` for a path that
    cannot be read or written. Anything else, a plain ``ValueError`` from library code included,
    is a bug and keeps its traceback.
    """
    try:
        return run()
    except (UserError, OSError) as e:
        if _debug():
            traceback.print_exc()
        kind = "" if isinstance(e, UserError) else f"{type(e).__name__}: "
        message = str(e) if not isinstance(e, OSError) or not e.filename else f"{e.strerror or e}: {e.filename}"
        print(f"{recipe}: {kind}{message}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None


#: Exit code of a command stopped by Ctrl-C (128 + SIGINT, the shell's convention).
EXIT_INTERRUPTED = 130


def run_reporting_user_errors(
    recipe: str, run: Callable[[DictConfig], Any], cfg: DictConfig, *, on_interrupt: Optional[str] = None
) -> int:
    """``run(cfg)`` under :func:`report_user_errors`; returns 0.

    Args:
        on_interrupt (Optional[str]): what to tell the user after Ctrl-C (one line, exit code
            :data:`EXIT_INTERRUPTED`, no traceback); None leaves Ctrl-C to the caller.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        report_user_errors(recipe, lambda: run(cfg))
    except KeyboardInterrupt:
        if on_interrupt is None:
            raise
        print(f"{recipe}: interrupted; {on_interrupt}", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    return 0


def instantiate(node: Optional[DictConfig], *args: Any, **kwargs: Any) -> Any:
    """torchtune's ``config.instantiate`` with the config path in error messages."""
    from torchtune import config as tt_config

    if node is None:
        return None
    component = node.get("_component_", "?")
    name = node._key() if isinstance(node, DictConfig) and node._key() is not None else component
    for key in map(str, node):
        # An input file a builder reads (a tokenizer's path, merges file): checked before it is
        # handed to a library that reports it with its own traceback (sentencepiece, tiktoken).
        if key == "path" or key.endswith(("_file", "_path")):
            value = node[key]
            if isinstance(value, str) and value and not Path(value).exists():
                raise ConfigError(f"{name}.{key}: file not found: {value}")
    try:
        return tt_config.instantiate(node, *args, **kwargs)
    except FileNotFoundError as e:
        raise ConfigError(f"{component}: file not found: {e.filename or e}") from e
    except TypeError as e:
        if "argument" in str(e):  # unexpected/missing keyword: a config mistake, not a bug
            raise ConfigError(f"{component}: {e}") from e
        raise
    except UserError:
        raise
    except ValueError as e:  # a builder refusing its arguments (torchtune: "No file with name ...")
        raise ConfigError(f"{name} ({component}): {e}") from e


def _experiments_of(recipe: str) -> list:
    names = []
    for name in bundled_experiments():
        try:
            if parse_experiment_name(name).recipe == recipe:
                names.append(name)
        except ConfigError:
            continue
    return names


def format_help(recipe: str, options_type: Type[Any]) -> str:
    """``--help``: usage, the bundled experiments of the recipe, every key with type and default."""
    lines = [f"usage: tune run {recipe} --config NAME_OR_PATH [key=value ...]", ""]
    lines.append("bundled configs: " + (", ".join(_experiments_of(recipe)) or "(none)"))
    lines.append("see a complete config: mas-config print NAME; copy one to edit: mas-config cp NAME my.yaml")
    lines.append("")
    lines.append("keys (type, default: why):")
    for info in option_infos(options_type):
        if info.is_component:
            default = "required" if info.required else "optional"
            lines.append(f"  {info.name}  (_component_ node, {default}): {info.help}")
        else:
            default = "required" if info.required else repr(info.default)
            lines.append(f"  {info.name}  ({describe_type(info.type)}, {default}): {info.help}")
    return "\n".join(lines)


def parse(recipe: str, options_type: Type[Any]) -> Callable[[Callable[[DictConfig], Any]], Callable[..., Any]]:
    """Decorator for a recipe's main: ``--config NAME_OR_PATH`` plus ``key=value`` overrides.

    The config is loaded and fully checked (keys, types, components) before the recipe starts;
    the recipe gets the ``DictConfig`` and types it with :func:`mas.config.to_options`.
    """
    if recipe not in KIND_RECIPES.values():
        raise ValueError(f"unknown recipe {recipe!r}")

    def decorate(recipe_main: Callable[[DictConfig], Any]) -> Callable[..., Any]:
        @functools.wraps(recipe_main)
        def main(argv: Optional[Sequence[str]] = None) -> Any:
            args = list(sys.argv[1:] if argv is None else argv)
            if "--debug" in args:
                args.remove("--debug")
                os.environ["MAS_DEBUG"] = "1"
            if "--help" in args or "-h" in args:
                print(format_help(recipe, options_type))
                return 0

            def load() -> DictConfig:
                if "--config" not in args or args.index("--config") == len(args) - 1:
                    raise ConfigError("--config NAME_OR_PATH is required (`--help` lists the bundled configs)")
                i = args.index("--config")
                config, overrides = args[i + 1], args[:i] + args[i + 2 :]
                flags = [a for a in overrides if a.startswith("--")]
                if flags:
                    raise ConfigError(f"unknown flags {flags}; use key=value overrides")
                cfg = load_config(config, overrides)
                to_options(cfg, options_type, recipe)
                return cfg

            cfg = report_user_errors(recipe, load)
            return recipe_main(cfg)

        return main

    return decorate
