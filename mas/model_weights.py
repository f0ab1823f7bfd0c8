"""Weights into a model: base checkpoints, LoRA adapters, and the checks that they belong together.

Fine-tuning and inference load through here, so both refuse the same mistakes with the same
messages: a base checkpoint that does not cover the model, an adapter for another LoRA shape, a
tokenizer larger than the embedding. :func:`load_adapter` is the one way to put an adapter
folder's weights into a model (``mas_generate``, ``mas_eval`` and its checkpoint sweep,
``mas_serve``).

An adapter only makes sense on the base it was trained on. Fine-tuning records that base in its
run's ``run.json`` (:func:`mas.fingerprint.weights_identity`: each weights file's size and a hash
of its first MiB), and :func:`check_trained_base` compares it with the base being loaded by
content, never by path: a copy of the base folder elsewhere is the same base, the tiny
checkpointer's folder rewritten with another ``pretrain_steps`` is not.
"""

from __future__ import annotations

import logging
import os
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from torch import nn

from mas.checkpointing import (
    ADAPTER_WEIGHTS_FILE,
    RUN_FILE,
    HFModelInfo,
    hf_info_from_checkpointer,
    latest_checkpoint,
    load_peft_adapter,
    peft_target_modules,
    peft_to_adapter,
)
from mas.errors import ConfigError, UserError
from mas.fingerprint import weights_identity

__all__ = [
    "BaseWeights",
    "LoadedAdapter",
    "check_trained_base",
    "check_lora_values",
    "check_vocab",
    "load_adapter",
    "load_adapter_state",
    "load_base_state",
    "read_base_state",
    "resolve_adapter_folder",
    "tokenizer_vocab_size",
]

log = logging.getLogger(__name__)


def check_lora_values(model_cfg: Any) -> None:
    """The LoRA numbers of a model node, checked before anything is built (a rank of 0 would
    divide by zero inside the builder).

    Raises:
        ConfigError: naming ``model.<key>`` and its allowed range.
    """
    rules = (
        ("lora_rank", lambda v: v >= 1, ">= 1"),
        ("lora_alpha", lambda v: v > 0, "> 0"),
        ("lora_dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    )
    for key, ok, allowed in rules:
        value = model_cfg.get(key) if model_cfg is not None else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not ok(value):
            raise ConfigError(f"model.{key} must be {allowed}, got {value!r}")


def tokenizer_vocab_size(tokenizer: Any) -> int:
    """The number of ids the tokenizer can emit (largest id + 1), across tokenizer families."""
    for attr in ("vocab_size",):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    ids = []
    encoder = getattr(tokenizer, "encoder", None)
    if encoder:
        ids.append(max(encoder.values()))
    special = getattr(tokenizer, "special_tokens", None)
    if special:
        ids.append(max(special.values()))
    if not ids:
        raise ConfigError(f"cannot tell the vocabulary size of {type(tokenizer).__name__}")
    return max(ids) + 1


def check_vocab(tokenizer: Any, model: nn.Module) -> None:
    """Every id the tokenizer emits must have an embedding row."""
    embedding = getattr(model, "tok_embeddings", None)
    if embedding is None:
        return
    needed = tokenizer_vocab_size(tokenizer)
    have = embedding.num_embeddings
    if needed > have:
        raise ConfigError(
            f"vocab size mismatch: the tokenizer emits ids up to {needed - 1} but the model has only "
            f"{have} embedding rows; the tokenizer and model checkpoint do not belong together"
        )


def read_base_state(checkpointer: Any) -> Dict[str, torch.Tensor]:
    """The base weights a torchtune checkpointer reads, in torchtune names.

    Raises:
        ConfigError: an unreadable weights file (truncated, corrupt), naming the folder; torchtune
            reports it as a ``ValueError`` that would otherwise pass for a bug.
    """
    try:
        return checkpointer.load_checkpoint()["model"]
    except UserError:
        raise
    except (SafetensorError, ValueError) as e:
        cause = f" ({type(e.__cause__).__name__}: {e.__cause__})" if e.__cause__ is not None else ""
        raise ConfigError(
            f"checkpointer.checkpoint_dir={getattr(checkpointer, '_checkpoint_dir', '?')}: {str(e).strip()}{cause}; "
            "a truncated or corrupt weights file? download or copy it again"
        ) from e


def load_base_state(model: nn.Module, base_state: Dict[str, torch.Tensor]) -> None:
    """Load base weights; every non-adapter parameter must be covered, nothing may be left over."""
    from torchtune.modules.peft import get_adapter_params

    missing, unexpected = model.load_state_dict(base_state, strict=False)
    adapter_names = set(get_adapter_params(model))
    missing_base = [k for k in missing if k not in adapter_names]
    if missing_base or unexpected:
        raise ConfigError(
            "the base checkpoint does not fit the model: "
            f"missing {missing_base[:5]}{'...' if len(missing_base) > 5 else ''}, "
            f"unexpected {list(unexpected)[:5]}{'...' if len(unexpected) > 5 else ''}"
        )


def load_adapter_state(model: nn.Module, adapter_state: Dict[str, torch.Tensor]) -> None:
    """Load LoRA weights (torchtune names), requiring an exact match with the model's adapters."""
    from torchtune.modules.peft import get_adapter_params

    expected = set(get_adapter_params(model))
    given = set(adapter_state)
    if given != expected:
        raise ConfigError(
            "the adapter does not fit the model: "
            f"missing {sorted(expected - given)[:4]}, unexpected {sorted(given - expected)[:4]}"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in adapter_state.items():
            if params[name].shape != value.shape:
                raise ConfigError(
                    f"the adapter does not fit the model: {name} has shape {tuple(value.shape)}, "
                    f"the model expects {tuple(params[name].shape)} (different base model or LoRA rank?)"
                )
            params[name].copy_(value)


def resolve_adapter_folder(path: str | os.PathLike) -> Path:
    """The adapter folder ``path`` names: a checkpoint folder itself, or a run folder's latest
    complete checkpoint.

    Raises:
        ConfigError: neither holds an adapter.
    """
    path = Path(path)
    if (path / ADAPTER_WEIGHTS_FILE).exists():
        return path
    latest = latest_checkpoint(path) if path.exists() else None
    if latest is not None:
        return latest
    raise ConfigError(f"adapter file not found: {path / ADAPTER_WEIGHTS_FILE} (nor a run folder with checkpoints/latest)")


def _check_lora_shape(adapter_config: Dict[str, Any], model_cfg: Any, path: Path) -> None:
    mismatches = []
    for key, cfg_key in (("r", "lora_rank"), ("lora_alpha", "lora_alpha")):
        if cfg_key in model_cfg and float(adapter_config.get(key, -1)) != float(model_cfg[cfg_key]):
            mismatches.append(f"{key}={adapter_config.get(key)} (config {cfg_key}={model_cfg[cfg_key]})")
    if "lora_attn_modules" in model_cfg:
        wanted = peft_target_modules(
            list(model_cfg.lora_attn_modules),
            model_cfg.get("apply_lora_to_mlp", False),
            model_cfg.get("apply_lora_to_output", False),
        )
        if sorted(wanted) != sorted(adapter_config.get("target_modules", [])):
            mismatches.append(f"target_modules={adapter_config.get('target_modules')} (config gives {wanted})")
    if mismatches:
        raise ConfigError(f"adapter {path} does not match the model config: " + "; ".join(mismatches))


#: Checkpointer arguments that say where the base is, not what it is.
_WHERE_ARGS = ("checkpoint_dir", "output_dir")


@dataclass(frozen=True)
class BaseWeights:
    """The base checkpoint a model was loaded from: what its adapters are converted for and
    checked against.

    Attributes:
        info (HFModelInfo): the checkpoint's architecture (PEFT names are converted for it).
        checkpoint_dir (Path): the folder the checkpointer reads.
        files (Tuple[str, ...]): the weight files it reads (empty: every weights file there).
        arguments (Dict[str, Any]): the checkpointer node's other arguments (the tiny
            checkpointer's ``seed`` and ``pretrain_steps``), to say what differs.
    """

    info: HFModelInfo
    checkpoint_dir: Path
    files: Tuple[str, ...] = ()
    arguments: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_checkpointer(cls, checkpointer: Any, node: Any = None) -> "BaseWeights":
        """The base a torchtune ``FullModelHFCheckpointer`` reads; ``node``: its config node."""
        info = hf_info_from_checkpointer(checkpointer)
        paths = getattr(checkpointer, "_checkpoint_paths", None) or ()
        arguments: Dict[str, Any] = {}
        if node is not None:
            plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
            arguments = {str(k): v for k, v in plain.items() if k not in _WHERE_ARGS}
        return cls(info, Path(checkpointer._checkpoint_dir), tuple(str(p) for p in paths), arguments)

    def weights(self) -> Dict[str, List[Any]]:
        """Each weights file's ``[size, head hash]``, as ``run.json`` records a base."""
        return weights_identity(self.checkpoint_dir, self.files or None)["weights"]


def _trained_base(adapter: Path) -> Tuple[Optional[Dict[str, Any]], Optional[Path]]:
    """What the adapter's fine-tuning run recorded about its base (None: nothing), and where."""
    if adapter.parent.name != "checkpoints":
        return None, None
    run_file = adapter.parent.parent / RUN_FILE
    try:
        run = json.loads(run_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, run_file
    recorded = run.get("base_weights") if isinstance(run, dict) else None
    if not isinstance(recorded, dict) or not isinstance(recorded.get("weights"), dict) or not recorded["weights"]:
        return None, run_file
    settings = run.get("settings")
    checkpointer = settings.get("checkpointer") if isinstance(settings, dict) else None
    return {**recorded, "checkpointer": checkpointer if isinstance(checkpointer, dict) else {}}, run_file


def _describe_weights(weights: Dict[str, List[Any]]) -> str:
    shown = [f"{Path(name).name} {size} bytes, head {head}" for name, (size, head) in list(weights.items())[:2]]
    return "; ".join(shown) + ("; ..." if len(weights) > 2 else "")


def _base_difference(trained: Dict[str, Any], base: BaseWeights, loaded: Dict[str, List[Any]]) -> str:
    """What tells the two bases apart: differing checkpointer arguments, else the weights."""
    recorded = {k: v for k, v in trained["checkpointer"].items() if k not in _WHERE_ARGS}
    show = lambda v: "unset" if v is None else json.dumps(v) if not isinstance(v, str) else v  # noqa: E731
    changed = [
        f"checkpointer.{k}={show(recorded.get(k))} (this config: {show(base.arguments.get(k))})"
        for k in sorted(set(recorded) | set(base.arguments))
        if recorded.get(k) != base.arguments.get(k)
    ]
    if changed:
        return "with " + ", ".join(changed)
    return f"(its weights: {_describe_weights(trained['weights'])}; these: {_describe_weights(loaded)})"


def check_trained_base(adapter: Path, base: BaseWeights, *, allow_other_base: bool = False) -> None:
    """Refuse an adapter whose fine-tuning run recorded another base than ``base``.

    The same base means the same content: every weights file loaded now has the size and head
    hash of a weights file of the recorded base, whatever its folder or name (a copied base
    folder is the same base). An adapter without a record (a run from before ``run.json``
    recorded its base, a PEFT adapter from elsewhere, a checkpoint folder copied out of its
    run) loads with a warning. ``allow_other_base`` (the recipes' key of that name) turns the
    refusal into a warning, for a deliberate cross-base experiment.

    Raises:
        ConfigError: one line naming the adapter, both bases and how to load the right one.
    """
    trained, run_file = _trained_base(adapter)
    if trained is None:
        log.warning(
            "adapter %s records no base model (no %s with base weights beside its checkpoints): "
            "cannot check that it was trained on the base in %s",
            adapter, RUN_FILE, base.checkpoint_dir,
        )
        return
    loaded = base.weights()
    trained_files = Counter(tuple(v) for v in trained["weights"].values())
    if loaded and not Counter(tuple(v) for v in loaded.values()) - trained_files:
        return
    mismatch = (
        f"adapter {adapter} was trained on the base in {trained.get('folder')} "
        f"{_base_difference(trained, base, loaded)}, not on the weights in checkpointer.checkpoint_dir="
        f"{base.checkpoint_dir}"
    )
    if allow_other_base:
        log.warning("%s; running it anyway (allow_other_base=True)", mismatch)
        return
    raise ConfigError(
        f"{mismatch}; point checkpointer.checkpoint_dir (and its settings) at the base recorded in {run_file}, "
        "or set allow_other_base=True to run it on this base anyway"
    )


@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter now in the model.

    Attributes:
        path (Path): the checkpoint folder it came from.
        config (dict): its PEFT ``adapter_config.json`` (with the ``"mas"`` settings of training).
    """

    path: Path
    config: Dict[str, Any]


def load_adapter(
    model: nn.Module,
    adapter_checkpoint: str | os.PathLike,
    base: BaseWeights,
    *,
    model_cfg: Optional[Any] = None,
    allow_other_base: bool = False,
) -> LoadedAdapter:
    """Put an adapter folder's LoRA weights into a model that holds its base weights.

    Args:
        model (nn.Module): a LoRA model (``lora_*`` builder) with the base weights loaded.
        adapter_checkpoint: a checkpoint folder (``.../checkpoints/step_N``), a PEFT adapter
            folder, or a run's ``output_dir`` (its latest checkpoint).
        base (BaseWeights): the base in the model; it must be the one the adapter's run recorded
            (:func:`check_trained_base`), and PEFT names are converted for its architecture.
        model_cfg: the model node; when given, the adapter's rank, alpha and target modules must
            equal its LoRA keys.
        allow_other_base (bool): warn instead of refusing an adapter trained on another base.

    Raises:
        ConfigError: a missing adapter file, a model without LoRA layers, an adapter trained on
            another base, or of another LoRA shape or base architecture.
    """
    from torchtune.modules.peft import get_adapter_params

    path = resolve_adapter_folder(adapter_checkpoint)
    try:
        peft_weights, adapter_config = load_peft_adapter(path)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"adapter {path}: unreadable adapter file ({type(e).__name__}: {e}); a truncated or corrupt copy? "
            "copy the checkpoint again or point adapter_checkpoint at another one"
        ) from None
    if not get_adapter_params(model):
        raise ConfigError(f"adapter_checkpoint={adapter_checkpoint} needs a LoRA model builder (lora_*)")
    check_trained_base(path, base, allow_other_base=allow_other_base)
    if model_cfg is not None:
        _check_lora_shape(adapter_config, model_cfg, path)
    try:
        adapter_state = peft_to_adapter(peft_weights, base.info)
    except ValueError as e:
        raise ConfigError(f"adapter {path} does not fit the base model: {e}") from None
    load_adapter_state(model, adapter_state)
    return LoadedAdapter(path, adapter_config)
