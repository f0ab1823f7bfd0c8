"""Typed recipe options: each key, its type, its default and its one-line reason, once.

A recipe's keys are a dataclass whose fields are declared with :func:`option`::

    @dataclass
    class GenerateOptions:
        max_new_tokens: int = option(64, "tokens to generate per prompt", min=1)
        attention: AttentionMode = option("mas", "the prompt mask: mas | causal")

That one declaration is the key's home: the default every config gets, the type and range
checked before any work starts, and the line ``--help`` and ``mas-config print`` show. Nodes
with a ``_component_`` (model, tokenizer, dataset, ...) are declared with :func:`component`;
their arguments are checked against the builder's own signature (:mod:`mas.config._components`).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import MISSING, dataclass, fields
from typing import Any, Dict, Iterable, List, Literal, Mapping, Optional, Tuple, Type, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf

from mas.errors import ConfigError

#: ``Optional[int]`` and ``int | None`` alike.
_UNION_TYPES = (typing.Union, types.UnionType)

__all__ = [
    "OptionInfo",
    "REQUIRED",
    "check_value",
    "component",
    "describe_type",
    "option",
    "option_infos",
    "suggest",
]

T = TypeVar("T")

#: Marks an option without a default: the config must set it.
REQUIRED: Any = MISSING


def option(default: Any = REQUIRED, help: str = "", *, min: Optional[float] = None, max: Optional[float] = None) -> Any:
    """A typed recipe key with its default and its one-line reason.

    Args:
        default: the value a config gets when it does not set the key; :data:`REQUIRED` (the
            default) makes the key mandatory. Lists and dicts are copied per instance.
        help (str): why the key exists, in one line (shown by ``--help``).
        min (Optional[float]): smallest allowed value (numbers).
        max (Optional[float]): largest allowed value (numbers).
    """
    metadata = {"help": help, "min": min, "max": max}
    if isinstance(default, (list, dict)):
        frozen = list(default) if isinstance(default, list) else dict(default)
        return dataclasses.field(default_factory=lambda: type(frozen)(frozen), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def component(help: str, *, required: bool = True) -> Any:
    """A ``_component_`` node (model, tokenizer, dataset, optimizer, ...).

    Args:
        help (str): what the component is, in one line.
        required (bool): False: the node may be absent or null (e.g. ``val_dataset``).
    """
    metadata = {"help": help, "component": True}
    return dataclasses.field(default=REQUIRED if required else None, metadata=metadata)


@dataclass(frozen=True)
class OptionInfo:
    """What one key of a recipe is, for checks and ``--help``."""

    name: str
    type: Any
    default: Any
    help: str
    required: bool
    is_component: bool
    min: Optional[float] = None
    max: Optional[float] = None


def option_infos(options_type: Type[Any]) -> List[OptionInfo]:
    """The keys of an options dataclass, in declaration order."""
    hints = typing.get_type_hints(options_type)
    infos = []
    for f in fields(options_type):
        if not f.init:
            continue
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = MISSING
        infos.append(
            OptionInfo(
                name=f.name,
                type=hints[f.name],
                default=default,
                help=f.metadata.get("help", ""),
                required=default is MISSING,
                is_component=bool(f.metadata.get("component")),
                min=f.metadata.get("min"),
                max=f.metadata.get("max"),
            )
        )
    return infos


def suggest(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def describe_type(tp: Any) -> str:
    """A short human name for a type hint: ``int``, ``mas | causal``, ``int or null``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in _UNION_TYPES:
        inner = [a for a in args if a is not type(None)]
        text = " or ".join(describe_type(a) for a in inner)
        return f"{text} or null" if type(None) in args else text
    if origin in (list, List, tuple, Tuple):
        return f"list of {describe_type(args[0])}" if args else "list"
    if origin in (dict, Dict, Mapping):
        return "mapping"
    if tp is Any:
        return "any value"
    return getattr(tp, "__name__", str(tp))


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def check_value(key: str, value: Any, tp: Any, *, min: Optional[float] = None, max: Optional[float] = None) -> Any:
    """Check ``value`` against the type hint ``tp`` (and range); return it converted.

    Ints are accepted where floats are expected (``lr: 1`` is 1.0); bools are never ints; a
    string is never a number (YAML reads ``2e-4`` as a string: it is converted, since users write
    learning rates that way).

    Raises:
        ConfigError: naming ``key``, the expected type and the value given.
    """
    ok, converted = _conforms(value, tp)
    choices = _literal_choices(tp)
    if not ok and choices:
        listed = ", ".join(repr(c) for c in choices[:-1]) + f" or {choices[-1]!r}" if len(choices) > 1 else repr(choices[0])
        raise ConfigError(f"{key} must be {listed}, got {_plain(value)!r}")
    if not ok:
        raise ConfigError(f"{key}: expected {describe_type(tp)}, got {_plain(value)!r}; set {key}=<{describe_type(tp)}>")
    if isinstance(converted, (int, float)) and not isinstance(converted, bool):
        if min is not None and converted < min:
            raise ConfigError(f"{key}: must be >= {min:g}, got {converted!r}")
        if max is not None and converted > max:
            raise ConfigError(f"{key}: must be <= {max:g}, got {converted!r}")
    return converted


def _literal_choices(tp: Any) -> List[Any]:
    """The allowed values of a ``Literal`` (or ``Optional[Literal]``) hint, else [] (also for a
    union with another type: ``latest | all`` or a list of steps is not a choice of two)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return list(typing.get_args(tp))
    if origin in _UNION_TYPES:
        per_arg = [_literal_choices(a) for a in typing.get_args(tp) if a is not type(None)]
        return [c for choices in per_arg for c in choices] if all(per_arg) else []
    return []


def _conforms(value: Any, tp: Any) -> Tuple[bool, Any]:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return True, value
    if origin in _UNION_TYPES:
        if value is None:
            return type(None) in args, None
        for arg in args:
            if arg is type(None):
                continue
            ok, converted = _conforms(value, arg)
            if ok:
                return True, converted
        return False, value
    if origin is Literal:
        return (value in args and not isinstance(value, bool)) or (isinstance(value, bool) and value in args), value
    if origin in (list, List, tuple, Tuple):
        if isinstance(value, ListConfig):
            value = list(value)
        if not isinstance(value, (list, tuple)):
            return False, value
        if args:
            out = []
            for item in value:
                ok, converted = _conforms(item, args[0])
                if not ok:
                    return False, value
                out.append(converted)
            return True, out
        return True, list(value)
    if origin in (dict, Dict, Mapping):
        return isinstance(value, (dict, DictConfig)), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if isinstance(tp, type):
        return isinstance(value, tp), value
    return True, value
