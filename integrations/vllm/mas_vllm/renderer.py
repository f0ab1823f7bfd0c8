"""vLLM's renderer mode ``mas``: chats and text prompts segmented by the project's own builder.

A chat request's messages, and a completion request's text (one user message, as ``mas_serve``
and ``mas_generate`` read a string), go through :class:`mas.segments.SegmentBuilder` with the
served model's recorded prompt format and merge setting (:mod:`mas_vllm.settings`): the token
ids and segments are the ones ``mas.generate`` prefills. Each prompt segment becomes one
``mas_segment`` item (:mod:`mas_vllm.segments`); the request's attention mode, known only once
vLLM has resolved the adapter the request names, then keeps them (``mas``) or drops them
(``causal``: vLLM attends causally), in :mod:`mas_vllm.policy`.

Messages that cannot be segmented (an unknown role, non-text content) are refused here (a
``ValueError``, which vLLM's server answers with a 400 naming it); segments that vLLM could not
serve exactly are refused once the request's mode is known (:mod:`mas_vllm.policy`).
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

from vllm.logger import init_logger
from vllm.renderers.base import BaseRenderer

from mas.generation.api import prompt_messages
from mas.segments import SegmentBuilder, SegmentedSequence
from mas_vllm.policy import SegmentLimits
from mas_vllm.policy import install as install_request_policy
from mas_vllm.segments import MODALITY, segment_items
from mas_vllm.settings import MasPromptSettings, settings_from_hf_config

__all__ = ["MasRenderer"]

logger = init_logger(__name__)

#: OpenAI role -> the builder's role (``developer`` is OpenAI's newer name for ``system``), as in mas_serve.
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ValueError(f"{where}[{j}]: only text parts can be segmented")
            parts.append(part["text"])
        return "".join(parts)
    raise ValueError(f"{where}: expected a string or a list of text parts")


class MasRenderer(BaseRenderer):
    """Builds every prompt with ``SegmentBuilder`` (see the module docstring).

    Args:
        config: vLLM's config.
        tokenizer: the ``mas`` tokenizer (:class:`mas_vllm.tokenizer.MasTokenizer`).
    """

    def __init__(self, config: Any, tokenizer: Any) -> None:
        super().__init__(config, tokenizer)
        install_request_policy()  # the renderer's process is the one that turns requests into engine inputs
        self.mas_settings: MasPromptSettings = settings_from_hf_config(self.model_config.hf_config)
        self.builder = SegmentBuilder.from_settings(self.get_tokenizer().torchtune, self.mas_settings.segment_settings())
        # What a segment must fit in (checked under mas by mas_vllm.policy).
        self.segment_limits = SegmentLimits(
            config.scheduler_config.max_num_batched_tokens, getattr(self.model_config.hf_text_config, "sliding_window", None)
        )
        logger.info(
            "mas-vllm: attention=%s prompt_format=%s merge_system_and_user=%s (from %s)",
            self.mas_settings.attention, self.mas_settings.prompt_format, self.mas_settings.merge_system_and_user, self.mas_settings.source,
        )

    # -- prompts ------------------------------------------------------------------------------
    def _prompt_of(self, sequence: SegmentedSequence) -> Dict[str, Any]:
        prompt: Dict[str, Any] = {"prompt_token_ids": list(sequence.tokens)}
        items = segment_items(sequence.tokens, sequence.segment_ids)
        if items:
            prompt["multi_modal_data"] = {MODALITY: items}
        return prompt

    def segmented(self, messages: List[Dict[str, Any]]) -> SegmentedSequence:
        """The builder's sequence of OpenAI-style messages (a final assistant message is continued).

        Raises:
            ValueError: unknown roles, empty or non-text content (naming ``messages[i]``).
        """
        normalized = []
        for i, message in enumerate(messages):
            role = message.get("role") if isinstance(message, dict) else None
            if role not in _ROLES:
                raise ValueError(f"messages[{i}].role: unknown role {role!r}; expected one of {sorted(_ROLES)}")
            normalized.append({"role": _ROLES[role], "content": _text(message.get("content"), f"messages[{i}].content")})
        return self.builder(prompt_messages({"messages": normalized}), for_generation=True)

    def render_messages(self, messages: List[Any], params: Any) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
        messages = [dict(m) for m in messages]
        sequence = self.segmented(messages)
        conversation = [{"role": m["role"], "content": _text(m.get("content"), "content")} for m in messages]
        return conversation, self._prompt_of(sequence)

    def render_prompt(self, prompt: Any) -> Any:
        if isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str) and "prompt_token_ids" not in prompt:
            # A completion's text is one user message, as mas_serve and mas_generate read it.
            sequence = self.builder(prompt_messages(prompt["prompt"]), for_generation=True)
            rendered = {k: v for k, v in prompt.items() if k != "prompt"}
            rendered.update(self._prompt_of(sequence))
            return rendered
        return super().render_prompt(prompt)

    async def _render_prompt_async(self, prompt: Any) -> Any:
        return self.render_prompt(prompt)
