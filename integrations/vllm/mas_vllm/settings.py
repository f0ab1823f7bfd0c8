"""How a served model's prompts are segmented: attention mode, prompt format, merge setting.

The project records them where the weights are (``mas.training.run_state.mas_settings``): an
adapter in its ``adapter_config.json`` (``"mas"``), merged weights in their ``config.json``
(``"mas"``). vLLM puts every key of ``config.json``, and of ``--hf-overrides``, on the model's
``hf_config``, so the plugin reads ``hf_config.mas``:

- a dict: the recorded settings (a merged checkpoint carries it; ``--hf-overrides`` may set it);
- a path: an adapter folder (``.../checkpoints/step_N``) or a run folder (its latest
  checkpoint), whose ``adapter_config.json`` is read: a base served with ``--lora-modules``
  names one of its adapters here, for the prompt format (each request's attention mode is then
  the adapter's it names: :mod:`mas_vllm.policy`);
- absent: :data:`mas.generation.options.PROMPT_DEFAULTS` (``mas``, ``text``, not merged), what
  ``mas_generate`` uses for a model without an adapter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

from mas.checkpointing import ADAPTER_CONFIG_FILE, latest_checkpoint
from mas.generation.options import PROMPT_DEFAULTS
from mas.masks import validate_attention_mode
from mas.segments import SegmentSettings

__all__ = ["MasPromptSettings", "MasSettingsError", "adapter_settings", "settings_from_hf_config"]


class MasSettingsError(ValueError):
    """The recorded settings cannot be read (one line for the user)."""


@dataclass(frozen=True)
class MasPromptSettings:
    """The prompt policy of one served model.

    Attributes:
        attention (str): ``"mas"`` (each prompt segment is one bidirectional range) or
            ``"causal"`` (no ranges: plain vLLM attention).
        prompt_format (str): ``"text"`` or ``"chat"`` (``mas.segments.SegmentBuilder``).
        merge_system_and_user (bool): consecutive prompt messages share one segment.
        source (str): where they were read from (for the start-up log line).
    """

    attention: str
    prompt_format: str
    merge_system_and_user: bool
    source: str

    def segment_settings(self) -> SegmentSettings:
        """The builder settings (no length limit: vLLM checks ``max_model_len`` itself)."""
        return SegmentSettings(self.prompt_format, self.merge_system_and_user)  # type: ignore[arg-type]


def _adapter_folder(path: Path) -> Path:
    folder = path if (path / ADAPTER_CONFIG_FILE).exists() else latest_checkpoint(path)
    if folder is None or not (folder / ADAPTER_CONFIG_FILE).exists():
        raise MasSettingsError(f"mas: {path} holds no {ADAPTER_CONFIG_FILE} (neither an adapter folder nor a run folder with a checkpoint)")
    return folder


def _recorded(folder: Path) -> Optional[Dict[str, Any]]:
    record = json.loads((folder / ADAPTER_CONFIG_FILE).read_text()).get("mas")
    return record if isinstance(record, dict) else None


def _settings_of(record: Mapping[str, Any], source: str) -> MasPromptSettings:
    # A key the record leaves out (or null) takes the project's default, as in prompt_settings.
    chosen = {key: default if record.get(key) is None else record[key] for key, default in PROMPT_DEFAULTS.items()}
    try:
        attention = validate_attention_mode(chosen["attention"])
        segments = SegmentSettings(chosen["prompt_format"], bool(chosen["merge_system_and_user"]))
    except ValueError as error:  # ConfigError is a ValueError
        raise MasSettingsError(f"mas: {error}") from None
    return MasPromptSettings(attention, segments.prompt_format, segments.merge_system_and_user, source)


def adapter_settings(path: Union[str, Path]) -> Optional[MasPromptSettings]:
    """The settings recorded in an adapter folder (or a run folder's latest checkpoint).

    Args:
        path: the folder.

    Returns:
        Optional[MasPromptSettings]: ``None`` when its ``adapter_config.json`` has no ``"mas"``
        entry (an adapter not written by ``mas_lora_finetune``).

    Raises:
        MasSettingsError: no ``adapter_config.json`` there, or a recorded value outside the
            project's choices.
    """
    folder = _adapter_folder(Path(path))
    record = _recorded(folder)
    return None if record is None else _settings_of(record, f"adapter {path}")


def settings_from_hf_config(hf_config: Any) -> MasPromptSettings:
    """The prompt settings of a model from its ``hf_config`` (see the module docstring).

    Args:
        hf_config: the model's Hugging Face config (``model_config.hf_config``).

    Raises:
        MasSettingsError: an unreadable record, or a value outside the project's choices.
    """
    raw: Optional[Union[str, Mapping[str, Any]]] = getattr(hf_config, "mas", None)
    if raw is None:
        return _settings_of({}, "defaults (no \"mas\" entry in config.json or --hf-overrides)")
    if isinstance(raw, (str, Path)):
        settings = adapter_settings(raw)
        if settings is None:
            raise MasSettingsError(f"mas: {_adapter_folder(Path(raw)) / ADAPTER_CONFIG_FILE} has no \"mas\" entry (not written by mas_lora_finetune)")
        return settings
    if isinstance(raw, Mapping):
        return _settings_of(raw, "config.json / --hf-overrides \"mas\" entry")
    raise MasSettingsError(f"mas: expected the recorded settings (a dict) or an adapter path, got {type(raw).__name__}")
