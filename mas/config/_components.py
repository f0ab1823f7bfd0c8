"""Strict ``_component_`` nodes: every argument, at every nesting level, checked before building.

A node ``{_component_: dotpath, key: value, ...}`` is checked against the signature of what
``dotpath`` names: an argument it does not take is an error with the closest name, and a value
whose annotation is a plain type (``int``, ``bool``, ``Literal[...]``, ``Optional[...]``, lists
of those) must match it. Builders that take ``**kwargs`` cannot be checked by name; this
project's own builders therefore spell their arguments out.
"""

from __future__ import annotations

import importlib
import inspect
import types
import typing
from typing import Any, Dict, Optional

from omegaconf import DictConfig, ListConfig

from mas.config._options import check_value, suggest
from mas.errors import ConfigError

#: ``Optional[int]`` and ``int | None`` alike.
_UNION_TYPES = (typing.Union, types.UnionType)

__all__ = ["check_components", "import_component"]

# Annotations we check values against; anything else (tensors, modules, callables) is left to
# the builder.
_CHECKABLE = (int, float, bool, str)


def import_component(dotpath: str, where: str) -> Any:
    """The object a ``_component_`` dotpath names.

    Raises:
        ConfigError: naming the key, when the module or attribute does not exist.
    """
    module_name, _, attr = str(dotpath).rpartition(".")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"{where}._component_: cannot import {dotpath!r} ({e}); check the dotted path") from None


def _checkable(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp in _CHECKABLE:
        return True
    if origin is typing.Literal:
        return True
    if origin in _UNION_TYPES:
        # Union[float, Tensor] (torch optimizers' lr): a config value is never a tensor, so the
        # plain members decide.
        return any(a is not type(None) and _checkable(a) for a in typing.get_args(tp))
    if origin in (list, typing.List):
        args = typing.get_args(tp)
        return bool(args) and _checkable(args[0])
    return False


def _type_hints(target: Any) -> Dict[str, Any]:
    try:
        return typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # unresolvable forward references in third-party code: check names only
        return {}


def _check_node(node: DictConfig, where: str) -> None:
    target = import_component(node["_component_"], where)
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return
    params = signature.parameters
    accepted = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    hints = _type_hints(target)
    for key in node:
        if key == "_component_":
            continue
        if key not in accepted:
            if takes_any:
                continue
            raise ConfigError(
                f"{where}.{key}: {node['_component_']} has no argument '{key}'{suggest(str(key), accepted)}"
            )
        raw = node._get_node(key)
        if raw is not None and getattr(raw, "_is_interpolation", lambda: False)():
            value = node[key]
        else:
            value = node[key]
        hint = hints.get(str(key))
        if hint is not None and _checkable(hint) and not isinstance(value, DictConfig):
            check_value(f"{where}.{key}", value, hint)


def check_components(node: Any, where: str = "") -> None:
    """Check every ``_component_`` node under ``node`` (see the module docstring).

    Raises:
        ConfigError: the first wrong key or value, named by its dotted path.
    """
    if isinstance(node, DictConfig):
        if "_component_" in node:
            _check_node(node, where or "<root>")
        for key in node:
            child = node._get_node(key)
            if isinstance(child, (DictConfig, ListConfig)):
                _walk_child(node[key], f"{where}.{key}" if where else str(key))
    elif isinstance(node, ListConfig):
        for i, value in enumerate(node):
            _walk_child(value, f"{where}[{i}]")


def _walk_child(child: Optional[Any], where: str) -> None:
    if isinstance(child, (DictConfig, ListConfig)):
        check_components(child, where)
