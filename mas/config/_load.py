"""Load a config (path or bundled experiment name), apply overrides, check it, type it.

``tune run mas_lora_finetune --config llama3_2_1b_mas.yaml`` passes the config string through
unchanged for recipes torchtune does not know, so the recipes resolve it here: an existing file
is used as is; otherwise a bundled experiment name (with or without ``.yaml``), composed by
:mod:`mas.config._bundled`. A file may start from a bundled experiment with
``base_config: <name or path>`` and change a few keys. Overrides follow torchtune (``a.b=1``,
``model=other.builder``, ``~key``).

Checks (:func:`validate_config`), before anything is built:

- every top-level key is an option of the recipe, or a *variable*: a key of the user's own
  that some ``${key...}`` interpolation uses (``base_dir: /data``, then ``${base_dir}/model``);
  anything else is an error with the closest option named;
- required keys are present; every value has its option's type and range;
- every ``_component_`` node takes exactly the arguments given, with their types
  (:mod:`mas.config._components`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Set, Type, TypeVar

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mas.assets import ASSETS_DIR
from mas.config._bundled import compose_experiment, parse_experiment_name, resolve_assets
from mas.config._components import check_components
from mas.config._options import check_value, option_infos, suggest
from mas.errors import ConfigError

__all__ = ["adapter_folder_name", "load_config", "resolved_yaml", "to_options", "validate_config", "with_defaults"]

T = TypeVar("T")
_BASE_KEY = "base_config"


def adapter_folder_name(adapter_checkpoint: Optional[str]) -> str:
    """A folder name for what an adapter path points at: ``base`` without one, the run's name for a
    run folder (``/tmp/mas_runs/tiny_mas`` -> ``tiny_mas``), ``<run>_<step>`` for one checkpoint
    (``.../tiny_mas/checkpoints/step_0000036`` -> ``tiny_mas_step_0000036``).
    """
    if not adapter_checkpoint:
        return "base"
    path = Path(str(adapter_checkpoint).rstrip("/"))
    if path.parent.name == "checkpoints":
        return f"{path.parent.parent.name}_{path.name}"
    return path.name


def _register_resolvers() -> None:
    register = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver
    if not OmegaConf.has_resolver("mas_asset"):
        # ${mas_asset:commonsense/train_sample/x.json} -> the bundled file, wherever mas lives.
        register("mas_asset", lambda rel: str(ASSETS_DIR / rel))
    if not OmegaConf.has_resolver("mas_adapter_name"):
        # ${mas_adapter_name:${adapter_checkpoint}}: default evaluation folders differ per adapter.
        register("mas_adapter_name", adapter_folder_name)


_register_resolvers()


def _load_file(path: Path, seen: Set[Path]) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except (OSError, OmegaConfBaseException, ValueError, yaml.YAMLError) as e:
        reason = " ".join(str(e).split())  # PyYAML's messages span lines
        raise ConfigError(f"{path}: not a readable YAML config ({type(e).__name__}: {reason})") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: a config must be a mapping of keys to values")
    if _BASE_KEY in cfg:
        base_name = str(cfg.pop(_BASE_KEY))
        resolved = path.resolve()
        if resolved in seen:
            raise ConfigError(f"{path}: base_config chain loops back to itself")
        base = _load_any(base_name, seen | {resolved}, relative_to=path.parent)
        cfg = OmegaConf.merge(base, cfg)  # type: ignore[assignment]
    return cfg


def _load_any(config: str, seen: Set[Path], relative_to: Optional[Path] = None) -> DictConfig:
    path = Path(config).expanduser()
    if not path.is_absolute() and relative_to is not None and (relative_to / path).is_file():
        path = relative_to / path
    if path.is_file():
        return _load_file(path, seen)
    name = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    if len(path.parts) != 1:
        raise ConfigError(f"config not found: {config!r} is not a file")
    return compose_experiment(parse_experiment_name(name))


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
        if not key or not re.fullmatch(r"[A-Za-z_][\w.\-]*", key):
            raise ConfigError(f"override {arg!r}: {key!r} is not a key (use a.b=value)")
        node = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
        if isinstance(node, DictConfig) and "_component_" in node:
            key += "._component_"  # model=other.builder keeps the component's kwargs
        try:
            if value == "None":
                OmegaConf.update(cfg, key, None, force_add=True)
            elif re.fullmatch(r"\d*:\d*", value):
                # A slice such as rows=1:30: YAML 1.1 would read "1:30" as the base-60 number 90.
                OmegaConf.update(cfg, key, value, force_add=True)
            else:
                cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{key}={value}"]))  # type: ignore[assignment]
        except OmegaConfBaseException as e:
            raise ConfigError(f"override {arg!r}: {e}") from None
        except yaml.YAMLError as e:
            # Usually a value the shell split: adapters={a: /x} unquoted arrives as 'adapters={a:'.
            problem = str(getattr(e, "problem", None) or e).strip()
            raise ConfigError(f"override {arg!r}: not a YAML value ({problem}); quote the whole override so the shell passes it as one argument, e.g. '{key}=[1, 2]'") from None
    return cfg


def load_config(config: str, overrides: Sequence[str] = ()) -> DictConfig:
    """Load a config (path or bundled experiment name) and apply ``key=value`` overrides.

    Raises:
        ConfigError: for a missing file or unknown name (with the closest bundled names), or a
            malformed override.
    """
    cfg = _apply_overrides(_load_any(config, set()), overrides)
    OmegaConf.set_struct(cfg, False)
    return cfg


_INTERPOLATION = re.compile(r"\$\{([^}:]+)\}")


def _interpolated_roots(node: Any) -> Set[str]:
    """Top-level keys that some ``${key...}`` interpolation under ``node`` refers to."""
    roots: Set[str] = set()
    if isinstance(node, DictConfig):
        items = [node._get_node(k) for k in node]
    elif isinstance(node, ListConfig):
        items = [node._get_node(i) for i in range(len(node))]
    else:
        return roots
    for child in items:
        if isinstance(child, (DictConfig, ListConfig)):
            roots |= _interpolated_roots(child)
        else:
            raw = child._value() if child is not None else None
            if isinstance(raw, str):
                for ref in _INTERPOLATION.findall(raw):
                    roots.add(ref.strip().lstrip(".").split(".")[0].split("[")[0])
    return roots


def with_defaults(cfg: DictConfig, options_type: Type[Any]) -> DictConfig:
    """``cfg`` with every option it does not set at its default, in declaration order.

    The defaults are the lowest layer, so ``${attention}`` resolves even where only the options
    dataclass sets ``attention``. Keys of ``cfg`` that are not options (variables) come last.
    """
    ordered = OmegaConf.create({})
    for info in option_infos(options_type):
        if info.name in cfg:
            ordered[info.name] = cfg._get_node(info.name)
        elif not info.required:
            ordered[info.name] = info.default
    for key in cfg:
        if key not in ordered:
            ordered[key] = cfg._get_node(key)
    OmegaConf.set_struct(ordered, False)
    return ordered


def validate_config(cfg: DictConfig, options_type: Type[Any], recipe: str) -> None:
    """Check ``cfg`` against the recipe's options (see the module docstring).

    Raises:
        ConfigError: the first problem, naming the key and how to fix it.
    """
    infos = {info.name: info for info in option_infos(options_type)}
    cfg = with_defaults(cfg, options_type)
    variables = _interpolated_roots(cfg)
    renamed = getattr(options_type, "RENAMED_KEYS", {})
    for key in cfg:
        if key in renamed and key not in infos:
            raise ConfigError(f"{recipe} has no key '{key}': it is '{renamed[key]}' here ({infos[renamed[key]].help}); set {renamed[key]}={cfg[key]}")
        if key not in infos and key not in variables:
            raise ConfigError(
                f"unknown config key '{key}' for {recipe}{suggest(str(key), infos)}; "
                f"`tune run {recipe} --help` lists the keys (your own variables are allowed when "
                "a ${...} interpolation uses them)"
            )
    missing = [name for name, info in infos.items() if info.required and cfg.get(name) is None]
    if missing:
        raise ConfigError(
            f"{recipe} config is missing {', '.join(missing)} ("
            + "; ".join(f"{k}: {infos[k].help}" for k in missing)
            + ")"
        )
    try:
        for name, info in infos.items():
            if name not in cfg:
                continue
            value = cfg[name]
            if info.is_component:
                if value is not None and (not isinstance(value, DictConfig) or "_component_" not in value):
                    raise ConfigError(f"{name}: expected a node with a _component_ ({info.help})")
                continue
            check_value(name, value, info.type, min=info.min, max=info.max)
        check_components(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot resolve the config: {e}") from None


#: Option and component argument names that hold a path (``~`` and ``$VAR`` are expanded).
_PATH_NAMES = ("adapter_checkpoint", "path", "source")
#: Options whose values (a mapping of names to paths) are all paths.
_PATH_MAPS = ("adapters",)
_PATH_SUFFIXES = ("_dir", "_file", "_path")
_UNSET_VARIABLE = re.compile(r"\$(\w+|\{\w+\})")


def _is_path_key(name: str) -> bool:
    return name in _PATH_NAMES or name.endswith(_PATH_SUFFIXES)


def _expanded_path(key: str, value: Any) -> Any:
    """``~`` and environment variables of a path expanded; an unset variable is refused."""
    if not isinstance(value, str) or ("~" not in value and "$" not in value):
        return value
    expanded = os.path.expanduser(os.path.expandvars(value))
    unset = _UNSET_VARIABLE.search(expanded)
    if unset:
        raise ConfigError(f"{key}={value}: environment variable {unset.group(1).strip('{}')} is not set; set it or write the path out")
    return expanded


def expand_paths(cfg: DictConfig) -> None:
    """Expand ``~`` and ``$VAR`` in place in every path key (top level and component arguments),
    so a folder literally named ``~`` is never made and every reader sees the same path.

    Raises:
        ConfigError: a path naming an unset environment variable.
    """

    def walk(node: DictConfig, prefix: str) -> None:
        for key in map(str, list(node.keys())):
            try:
                value = node[key]
            except OmegaConfBaseException:
                continue  # an unresolvable interpolation: the checks report it
            if isinstance(value, DictConfig):
                walk(value, f"{prefix}{key}.")
            elif _is_path_key(key) or prefix.rstrip(".") in _PATH_MAPS:
                expanded = _expanded_path(prefix + key, value)
                if expanded is not value:
                    node[key] = expanded

    walk(cfg, "")


def to_options(cfg: DictConfig, options_type: Type[T], recipe: str) -> T:
    """Validate ``cfg`` and return the recipe's typed options.

    Scalar keys become plain Python values (defaults filled in); component nodes stay
    ``DictConfig`` for :func:`mas.config.instantiate`. Calls the options' ``check()`` (cross-key
    rules) when it has one.
    """
    validate_config(cfg, options_type, recipe)
    expand_paths(cfg)
    cfg = with_defaults(cfg, options_type)
    values: Dict[str, Any] = {}
    for info in option_infos(options_type):
        if info.name not in cfg:
            continue
        value = cfg[info.name]
        if not info.is_component:
            value = check_value(info.name, value, info.type, min=info.min, max=info.max)
            if isinstance(value, (DictConfig, ListConfig)):
                value = OmegaConf.to_container(value, resolve=True)
        values[info.name] = value
    options = options_type(**values)
    check = getattr(options, "check", None)
    if callable(check):
        check()
    return options


def resolved_yaml(cfg: DictConfig, options_type: Optional[Type[Any]] = None, *, resolve: bool = True) -> str:
    """The config as YAML, every option present (defaults filled in, each with its reason).

    Args:
        cfg (DictConfig): a loaded config.
        options_type: the recipe's options; their defaults are added and their help written
            as comments. None: the config as it is.
        resolve (bool): True resolves every interpolation (the record of a run); False keeps
            ``${...}`` links between keys (a config to edit) but still inlines bundled asset
            paths, so the file needs no custom resolver.
    """
    helps: Dict[str, str] = {}
    full = cfg
    if options_type is not None:
        helps = {info.name: info.help for info in option_infos(options_type)}
        full = with_defaults(cfg, options_type)
    if resolve:
        text = OmegaConf.to_yaml(full, resolve=True)
    else:
        text = resolve_assets(OmegaConf.to_yaml(full, resolve=False), ASSETS_DIR)
    if not helps:
        return text
    lines = []
    for line in text.splitlines():
        key = line.split(":", 1)[0]
        if key in helps and helps[key] and not line.startswith(" "):
            lines.append(f"# {helps[key]}")
        lines.append(line)
    return "\n".join(lines) + "\n"
