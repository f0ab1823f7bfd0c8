"""Recipe configs: find them, merge ``key=value`` overrides, and fail fast on mistakes.

``tune run mas_lora_finetune --config llama3_2_1b_mas.yaml`` passes the config string through
unchanged for recipes torchtune does not know, so the recipes resolve it here: an existing path
is used as is; otherwise a bundled config name (with or without ``.yaml``) from the project's
``configs/``. Overrides follow torchtune (``a.b=1``, ``model=other.builder``, ``~key``).

Validation is strict: an unknown top-level key, or an argument a ``_component_`` does not take,
stops the run before anything is built, with the closest valid name suggested.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, List, Mapping, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from mas.assets import ASSETS_DIR
from mas.errors import ConfigError

__all__ = [
    "ConfigError",
    "RecipeKeys",
    "bundled_config_dirs",
    "instantiate",
    "load_config",
    "parse",
    "resolve_config_path",
    "run_reporting_user_errors",
    "validate_config",
]


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("mas_asset"):
        # ${mas_asset:commonsense/train_sample/x.json} -> the bundled file, wherever mas lives.
        register = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver
        register("mas_asset", lambda rel: str(ASSETS_DIR / rel))


def bundled_config_dirs() -> List[Path]:
    """Where bundled configs live: the source checkout's ``configs/``, then a wheel's data dir."""
    dirs = [Path(__file__).resolve().parents[1] / "configs"]
    dirs.append(Path(sysconfig.get_paths()["data"]) / "share" / "mas-tune" / "configs")
    return [d for d in dirs if d.is_dir()]


def _bundled_names() -> List[str]:
    return sorted({p.stem for d in bundled_config_dirs() for p in d.glob("*.yaml")})


def resolve_config_path(config: str) -> Path:
    """An existing path, or a bundled config name (``llama3_2_1b_mas`` or ``llama3_2_1b_mas.yaml``).

    Raises:
        ConfigError: naming the closest bundled configs.
    """
    path = Path(config).expanduser()
    if path.is_file():
        return path
    name = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    if len(path.parts) == 1:
        for d in bundled_config_dirs():
            candidate = d / f"{name}.yaml"
            if candidate.is_file():
                return candidate
    close = difflib.get_close_matches(name, _bundled_names(), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; bundled configs: {', '.join(_bundled_names())}"
    raise ConfigError(f"config not found: {config!r} is neither a file nor a bundled config{hint}")


def _apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    for arg in overrides:
        if arg.startswith("~"):
            dotpath = arg[1:]
            parent_path, _, leaf = dotpath.rpartition(".")
            parent = OmegaConf.select(cfg, parent_path) if parent_path else cfg
            if parent is None or leaf not in parent:
                raise ConfigError(f"cannot remove {dotpath!r}: no such key in the config")
            del parent[leaf]
            continue
        if "=" not in arg:
            raise ConfigError(f"overrides must be key=value, got {arg!r}")
        key, value = arg.split("=", 1)
        node = OmegaConf.select(cfg, key)
        if isinstance(node, DictConfig) and "_component_" in node:
            key += "._component_"  # model=other.builder keeps the component's kwargs
        parsed = OmegaConf.from_dotlist([f"{key}={value}"])
        if value == "None":
            OmegaConf.update(cfg, key, None, force_add=True)
        else:
            cfg = OmegaConf.merge(cfg, parsed)
    return cfg


def load_config(config: str, overrides: Sequence[str] = ()) -> DictConfig:
    """Load a config (path or bundled name) and apply ``key=value`` overrides."""
    _register_resolvers()
    path = resolve_config_path(config)
    cfg = OmegaConf.load(path)
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: a config must be a mapping of keys to values")
    cfg = _apply_overrides(cfg, overrides)
    cfg._metadata.ref_type = DictConfig
    OmegaConf.set_struct(cfg, False)
    return cfg


@dataclass(frozen=True)
class RecipeKeys:
    """The top-level keys a recipe understands.

    Attributes:
        recipe (str): recipe name, for messages.
        required (Mapping[str, str]): key -> what it is.
        optional (Mapping[str, str]): key -> what it is.
    """

    recipe: str
    required: Mapping[str, str]
    optional: Mapping[str, str] = field(default_factory=dict)

    @property
    def all(self) -> List[str]:
        return [*self.required, *self.optional]


def _suggest(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _import_component(dotpath: str, where: str) -> Any:
    module_name, _, attr = dotpath.rpartition(".")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"{where}._component_: cannot import {dotpath!r} ({e})") from None


def _check_component(node: DictConfig, where: str) -> None:
    target = _import_component(str(node["_component_"]), where)
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return
    params = signature.parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for key in node:
        if key != "_component_" and key not in accepted:
            raise ConfigError(
                f"{where}.{key}: {node['_component_']} has no argument '{key}'{_suggest(str(key), accepted)}"
            )


def _walk_components(node: Any, where: str) -> None:
    if isinstance(node, DictConfig):
        if "_component_" in node:
            _check_component(node, where)
        for key in node:
            value = node._get_node(key)
            if isinstance(value, (DictConfig, ListConfig)):
                _walk_components(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, ListConfig):
        for i, value in enumerate(node):
            _walk_components(value, f"{where}[{i}]")


def validate_config(cfg: DictConfig, keys: RecipeKeys) -> None:
    """Unknown or missing top-level keys and unknown component arguments raise ``ConfigError``."""
    for key in cfg:
        if key not in keys.all:
            raise ConfigError(f"unknown config key '{key}' for {keys.recipe}{_suggest(str(key), keys.all)}")
    missing = [k for k in keys.required if k not in cfg]
    if missing:
        raise ConfigError(
            f"{keys.recipe} config is missing {', '.join(missing)} ("
            + "; ".join(f"{k}: {keys.required[k]}" for k in missing)
            + ")"
        )
    _walk_components(cfg, "")


def instantiate(node: Optional[DictConfig], *args: Any, **kwargs: Any) -> Any:
    """torchtune's ``config.instantiate`` with the config path in error messages."""
    from torchtune import config as tt_config

    if node is None:
        return None
    component = node.get("_component_", "?")
    try:
        return tt_config.instantiate(node, *args, **kwargs)
    except FileNotFoundError as e:
        raise ConfigError(f"{component}: file not found: {e.filename or e}") from e
    except TypeError as e:
        if "argument" in str(e):  # unexpected/missing keyword: a config mistake, not a bug
            raise ConfigError(f"{component}: {e}") from e
        raise


def run_reporting_user_errors(recipe: str, run: Callable[[DictConfig], Any], cfg: DictConfig) -> int:
    """Run a recipe; a config or data mistake (or a bad value) ends it with one line, no traceback."""
    import logging

    from mas.data.rows import DataError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        run(cfg)
    except (ConfigError, DataError, ValueError) as e:
        raise SystemExit(f"{recipe}: {type(e).__name__}: {e}") from None
    return 0


def parse(keys: RecipeKeys) -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """Decorator for a recipe's main: ``--config NAME_OR_PATH`` plus ``key=value`` overrides."""

    def decorate(recipe_main: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        @functools.wraps(recipe_main)
        def main(argv: Optional[Sequence[str]] = None) -> Any:
            args = list(sys.argv[1:] if argv is None else argv)
            if "--help" in args or "-h" in args:
                print(f"usage: tune run {keys.recipe} --config NAME_OR_PATH [key=value ...]\n")
                print("bundled configs:", ", ".join(_bundled_names()))
                print("keys:", ", ".join(keys.all))
                return 0
            if "--config" not in args or args.index("--config") == len(args) - 1:
                raise SystemExit(f"{keys.recipe}: --config NAME_OR_PATH is required")
            i = args.index("--config")
            config, overrides = args[i + 1], args[:i] + args[i + 2 :]
            flags = [a for a in overrides if a.startswith("--")]
            if flags:
                raise SystemExit(f"{keys.recipe}: unknown flags {flags}; use key=value overrides")
            try:
                cfg = load_config(config, overrides)
                validate_config(cfg, keys)
            except ConfigError as e:
                raise SystemExit(f"{keys.recipe}: config error: {e}") from None
            return recipe_main(cfg)

        return main

    return decorate
