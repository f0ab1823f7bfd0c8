"""Each request's attention mode: the served model's, or that of the LoRA adapter it names.

One server may hold several adapters (``--lora-modules mas=... causal=...``), each trained
with its own attention mode, which ``mas_lora_finetune`` records in its ``adapter_config.json``.
vLLM renders a prompt before it knows which adapter the request names, so the renderer builds
every prompt with the server's prompt format and attaches its segments; vLLM's input processor,
which receives the request's ``LoRARequest``, then applies the request's mode
(:func:`apply_request_policy`, installed by :func:`install`):

- ``mas``: the segments stay (each one a bidirectional range). Refused: a prompt without any
  (token ids sent without ``mas_segment`` items: ids carry no segments); a segment longer than
  the scheduler's token budget (``--max-num-batched-tokens``: a segment is prefilled in one
  step, so it would never be scheduled; a backstop, since the config hook keeps the budget at
  least the context); a segment longer than the model's sliding window (vLLM would drop that
  range, causal inside);
- ``causal``: the segments are dropped and vLLM attends causally (no length rule applies).

The mode is the adapter's recorded one, or the server's for the base model and for an adapter
without a record (one not written by ``mas_lora_finetune``). An adapter recorded with another
prompt format or merge setting than the server's is refused: its prompts would need other token
ids, and those are built before the adapter is known. Every refusal is vLLM's
``VLLMValidationError``, which its server answers with a 400 naming it (a plain ``ValueError``
raised this late would be a 500).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence

from vllm.exceptions import VLLMValidationError
from vllm.logger import init_logger

from mas_vllm.segments import MODALITY
from mas_vllm.settings import MasPromptSettings, MasSettingsError, adapter_settings

__all__ = ["SegmentLimits", "apply_request_policy", "check_segments", "install", "request_settings"]

logger = init_logger(__name__)


@dataclass(frozen=True)
class SegmentLimits:
    """What one MAS segment must fit in.

    Attributes:
        max_tokens (int): the scheduler's token budget (``max_num_batched_tokens``).
        sliding_window (Optional[int]): the model's window, if any.
    """

    max_tokens: int
    sliding_window: Optional[int] = None


def check_segments(lengths: Sequence[int], limits: SegmentLimits) -> None:
    """Refuse segments that vLLM would not serve exactly (see the module docstring).

    Args:
        lengths (Sequence[int]): the prompt's segment lengths, in order.
        limits (SegmentLimits): the server's.

    Raises:
        VLLMValidationError: one line naming the segment, its length and the setting to change.
    """
    for i, n in enumerate(lengths):
        if n > limits.max_tokens:
            raise VLLMValidationError(
                f"prompt segment {i} has {n} tokens, more than the scheduler's token budget max_num_batched_tokens="
                f"{limits.max_tokens} (a segment is prefilled in one step): restart with --max-num-batched-tokens {n} or "
                "more, or shorten the message",
                parameter="messages",
            )
        if limits.sliding_window is not None and n > limits.sliding_window:
            raise VLLMValidationError(
                f"prompt segment {i} has {n} tokens, more than the model's sliding window ({limits.sliding_window}); vLLM "
                "would attend causally inside it: shorten the message or serve with --disable-sliding-window",
                parameter="messages",
            )


@functools.lru_cache(maxsize=256)
def _recorded_settings(lora_path: str) -> Optional[MasPromptSettings]:
    try:
        return adapter_settings(lora_path)
    except MasSettingsError as error:
        raise VLLMValidationError(f"{error} (mas-vllm reads the adapter's recorded settings from its local folder)", parameter="model") from None


def request_settings(server: MasPromptSettings, lora_request: Any) -> MasPromptSettings:
    """The prompt settings a request runs under (see the module docstring).

    Args:
        server (MasPromptSettings): the served model's (what the renderer built the prompt with).
        lora_request: vLLM's ``LoRARequest`` of the request, or ``None`` for the base model.

    Raises:
        VLLMValidationError: the adapter's folder is unreadable, or its recorded prompt format or merge
            setting is not the server's.
    """
    if lora_request is None:
        return server
    recorded = _recorded_settings(str(lora_request.lora_path))
    if recorded is None:
        logger.warning_once("mas-vllm: adapter %s records no MAS settings; it is prompted as the server is (attention=%s)", lora_request.lora_name, server.attention)
        return server
    if (recorded.prompt_format, recorded.merge_system_and_user) != (server.prompt_format, server.merge_system_and_user):
        raise VLLMValidationError(
            f"adapter {lora_request.lora_name!r} was trained with prompt_format={recorded.prompt_format}, "
            f"merge_system_and_user={recorded.merge_system_and_user}, but this server builds prompts with "
            f"prompt_format={server.prompt_format}, merge_system_and_user={server.merge_system_and_user} (from "
            f"{server.source}): serve it from a server whose --hf-overrides '{{\"mas\": ...}}' names it",
            parameter="model",
        )
    return recorded


def apply_request_policy(engine_input: Dict[str, Any], settings: MasPromptSettings, limits: SegmentLimits) -> Dict[str, Any]:
    """The rendered prompt with the request's attention mode applied.

    Args:
        engine_input (dict): vLLM's rendered input (``type`` ``"token"`` or ``"multimodal"``).
        settings (MasPromptSettings): the request's settings (:func:`request_settings`).
        limits (SegmentLimits): what each segment must fit in (under ``mas``).

    Returns:
        dict: ``engine_input`` itself under ``mas``; under ``causal``, the same token ids with no
        segment items.

    Raises:
        VLLMValidationError: under ``mas``, a prompt without segment items, or a segment over the
            limits (:func:`check_segments`).
    """
    placeholders = (engine_input.get("mm_placeholders") or {}) if engine_input.get("type") == "multimodal" else {}
    has_segments = bool(placeholders.get(MODALITY))
    if settings.attention == "mas":
        if not has_segments:
            raise VLLMValidationError(
                "a token-id prompt carries no segments: send text or chat messages, or pass "
                f"multi_modal_data={{'{MODALITY}': [{{'start': ..., 'token_ids': [...]}}, ...]}}",
                parameter="prompt",
            )
        check_segments([placeholder.length for placeholder in placeholders[MODALITY]], limits)
        return engine_input
    if not has_segments:
        return engine_input
    if set(placeholders) != {MODALITY}:
        raise VLLMValidationError(f"mas-vllm serves text only: got multimodal items {sorted(set(placeholders) - {MODALITY})}")
    causal = {"type": "token", "prompt_token_ids": engine_input["prompt_token_ids"]}
    causal.update({key: engine_input[key] for key in ("prompt", "arrival_time", "cache_salt") if key in engine_input})
    return causal


def _with_request_policy(process_inputs: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(process_inputs)

    @functools.wraps(process_inputs)
    def process_inputs_with_policy(self: Any, *args: Any, **kwargs: Any) -> Any:
        server = getattr(self.renderer, "mas_settings", None)
        if server is None:  # not a model served by the plugin
            return process_inputs(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        prompt = bound.arguments["prompt"]
        if not (isinstance(prompt, dict) and "type" in prompt):  # a raw prompt: render it as vLLM would
            tok_params = self.renderer.default_cmpl_tok_params.with_kwargs(**(bound.arguments.get("tokenization_kwargs") or {}))
            from vllm.renderers.inputs.preprocess import parse_model_prompt

            (prompt,) = self.renderer.render_cmpl([parse_model_prompt(self.model_config, prompt)], tok_params)
        settings = request_settings(server, bound.arguments.get("lora_request"))
        bound.arguments["prompt"] = apply_request_policy(prompt, settings, self.renderer.segment_limits)
        return process_inputs(*bound.args, **bound.kwargs)

    process_inputs_with_policy.__mas_vllm_policy__ = True  # type: ignore[attr-defined]
    return process_inputs_with_policy


def install() -> None:
    """Wrap vLLM's ``InputProcessor.process_inputs`` (once per process) so that every request of a
    model served by the plugin runs under its own attention mode."""
    from vllm.v1.engine.input_processor import InputProcessor

    if not getattr(InputProcessor.process_inputs, "__mas_vllm_policy__", False):
        InputProcessor.process_inputs = _with_request_policy(InputProcessor.process_inputs)
