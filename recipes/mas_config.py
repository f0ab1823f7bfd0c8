"""``mas-config``: list, print, copy and check this project's configs (torchtune's ``tune ls``,
``tune cp`` and ``tune validate`` only know torchtune's own registry).

    mas-config ls                                 # every bundled experiment, its recipe, the variants
    mas-config print llama3_2_1b_mas [key=value]  # the complete config, every key with its reason
    mas-config cp llama3_2_1b_mas my.yaml         # a standalone copy to edit and run
    mas-config validate my.yaml                   # check keys, types and components, build nothing

A copied file runs as is (``tune run mas_lora_finetune --config my.yaml``); it keeps the
``${...}`` links between keys (change ``output_dir`` once) but no project-specific resolver, so
torchtune's own ``tune validate`` accepts it too. Its first line names its recipe.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path
from typing import Any, Optional, Sequence, Type

from mas.config import (
    ConfigError,
    bundled_experiments,
    bundled_models,
    load_config,
    parse_experiment_name,
    report_user_errors,
    resolved_yaml,
    shared_variants,
    to_options,
)

PROG = "mas-config"
#: recipe -> its options dataclass (module:attribute).
RECIPE_OPTIONS = {
    "mas_lora_finetune": "mas.training.options:FinetuneOptions",
    "mas_lora_finetune_distributed": "mas.training.options:DistributedFinetuneOptions",
    "mas_eval": "mas.evaluation.options:EvalOptions",
    "mas_generate": "mas.generation.options:GenerateOptions",
    "mas_serve": "mas.serving.options:ServeOptions",
}
_HEADER = "# recipe: "


def options_of(recipe: str) -> Type[Any]:
    """The options dataclass of ``recipe``."""
    if recipe not in RECIPE_OPTIONS:
        raise ConfigError(f"unknown recipe {recipe!r}; one of {', '.join(RECIPE_OPTIONS)}")
    module, _, attr = RECIPE_OPTIONS[recipe].partition(":")
    return getattr(importlib.import_module(module), attr)


def _recipe_of_file(path: Path, given: Optional[str]) -> str:
    if given:
        return given
    text = path.read_text()
    first = text.splitlines()[:1]
    if first and first[0].startswith(_HEADER):
        return first[0][len(_HEADER) :].split()[0]
    # A file that starts from another config (base_config: NAME or a path) has that config's recipe.
    base = re.search(r"^base_config:\s*['\"]?([^'\"#\s]+)", text, re.M)
    if base:
        name = base.group(1)
        parent = (path.parent / name) if name.endswith((".yaml", ".yml")) else None
        if parent is not None and parent.is_file():
            return _recipe_of_file(parent, None)
        try:
            return parse_experiment_name(Path(name).stem if name.endswith((".yaml", ".yml")) else name).recipe
        except ConfigError:
            pass
    raise ConfigError(f"{path}: cannot tell its recipe; pass --recipe (one of {', '.join(RECIPE_OPTIONS)})")


def _document(name: str, overrides: Sequence[str]) -> str:
    recipe = parse_experiment_name(Path(name).stem if name.endswith(".yaml") else name).recipe
    cfg = load_config(name, overrides)
    options = options_of(recipe)
    to_options(cfg, options, recipe)
    return f"{_HEADER}{recipe}   (tune run {recipe} --config <this file>)\n" + resolved_yaml(cfg, options, resolve=False)


def _list_experiments() -> None:
    """The experiments, then the variants a name can end with (``llama3_2_1b_mas_packed``)."""
    names = bundled_experiments()
    width = max(len(n) for n in names)
    print(f"{'CONFIG':<{width}}  RECIPE")
    for name in names:
        print(f"{name:<{width}}  {parse_experiment_name(name).recipe}")
    print("\nVARIANTS: append to a name above (e.g. llama3_2_1b_mas_packed; several in order: _packed_qlora)")
    models = bundled_models()
    width = max(len("every model"), *(len(m.name) for m in models))
    print(f"{'every model':<{width}}  {', '.join(shared_variants())}")
    for model in models:
        if model.variants:
            print(f"{model.name:<{width}}  {', '.join(model.variants)}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ls", help="list the bundled experiments")
    p_print = sub.add_parser("print", help="print an experiment's complete config")
    p_print.add_argument("name")
    p_print.add_argument("overrides", nargs="*")
    p_cp = sub.add_parser("cp", help="copy an experiment's complete config to a file")
    p_cp.add_argument("name")
    p_cp.add_argument("file")
    p_cp.add_argument("overrides", nargs="*")
    p_cp.add_argument("--force", action="store_true", help="overwrite an existing file")
    p_val = sub.add_parser("validate", help="check a config file (keys, types, components)")
    p_val.add_argument("file")
    p_val.add_argument("overrides", nargs="*")
    p_val.add_argument("--recipe", choices=sorted(RECIPE_OPTIONS))
    args = parser.parse_args(argv)

    def run() -> int:
        if args.command == "ls":
            _list_experiments()
        elif args.command == "print":
            sys.stdout.write(_document(args.name, args.overrides))
        elif args.command == "cp":
            out = Path(args.file)
            if out.exists() and not args.force:
                raise ConfigError(f"{out} exists; pass --force to overwrite it")
            text = _document(args.name, args.overrides)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
            recipe = parse_experiment_name(Path(args.name).stem).recipe
            print(f"wrote {out}; run it with: tune run {recipe} --config {out}")
        else:
            path = Path(args.file)
            if not path.is_file():
                raise ConfigError(f"{path}: no such file")
            recipe = _recipe_of_file(path, args.recipe)
            to_options(load_config(str(path), args.overrides), options_of(recipe), recipe)
            print(f"{path}: valid {recipe} config")
        return 0

    return report_user_errors(PROG, run)


if __name__ == "__main__":
    sys.exit(main())
