"""Llama 3.x, Qwen2/2.5 and Mistral as MAS models: vLLM's own classes plus prompt segments.

Each class is vLLM's text model with :class:`MasSegmentsMixin`: it declares the ``mas_segment``
modality (:mod:`mas_vllm.segments`), so vLLM's prefix-LM path gives every prompt segment
bidirectional attention, and returns a segment's own token embeddings as its "multimodal"
embedding (the prompt's numbers are unchanged). The weights, LoRA support and tensor parallelism
are vLLM's.

The config hook (:mod:`mas_vllm.config_hook`) turns the ranges on; the model checks at start-up
that they are honoured (the hook ran, segments are never chunked, the attention backend reads
the ranges) and refuses to start otherwise.
"""

from __future__ import annotations

from typing import Any, List

import torch
from torch import nn
from vllm.model_executor.models.interfaces import SupportsMultiModal
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.multimodal import MULTIMODAL_REGISTRY

from mas_vllm.segments import SEGMENT_IDS_KEY, MasSegmentDummyInputs, MasSegmentInfo, MasSegmentProcessor

__all__ = ["ARCHITECTURES", "MasLlamaForCausalLM", "MasMistralForCausalLM", "MasQwen2ForCausalLM", "MasStartupError"]


class MasStartupError(RuntimeError):
    """The server cannot serve MAS prompts exactly as configured (one line for the user)."""


def _attention_backends(model: nn.Module) -> List[type]:
    """The backend class of every vLLM attention layer of ``model``, each once."""
    from vllm.model_executor.layers.attention.attention import Attention

    backends: List[type] = []
    for module in model.modules():
        if isinstance(module, Attention) and module.attn_backend not in backends:
            backends.append(module.attn_backend)
    return backends


def check_backend_honours_ranges(model: nn.Module) -> None:
    """Refuse a backend that would silently attend causally inside a segment.

    Raises:
        MasStartupError: naming the backend (vLLM's CPU backend is one: it ignores the ranges).
    """
    for backend in _attention_backends(model):
        if not backend.supports_mm_prefix():
            raise MasStartupError(
                f"mas-vllm: attention backend {backend.get_name()} ignores prefix-LM ranges, so every MAS prompt would "
                "run causally; use a range-aware backend (on CUDA: FLEX_ATTENTION, TRITON_ATTN or FLASH_ATTN, which vLLM "
                "picks by itself; vLLM's CPU backend cannot serve MAS)"
            )


class MasSegmentsMixin(SupportsMultiModal):
    """Prompt segments as ``mas_segment`` items: the embeddings of a segment's own tokens."""

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> None:
        return None  # segments are existing prompt tokens: nothing is inserted

    def _mas_check(self, vllm_config: Any) -> None:
        if not vllm_config.model_config.is_mm_prefix_lm:
            raise MasStartupError("mas-vllm: is_mm_prefix_lm is off (the plugin's config hook did not run); reinstall mas-vllm")
        if not vllm_config.scheduler_config.disable_chunked_mm_input:
            raise MasStartupError("mas-vllm: a segment could be split over two steps; pass --disable-chunked-mm-input")
        check_backend_honours_ranges(self)

    def embed_multimodal(self, **kwargs: object) -> List[torch.Tensor]:
        """The token embeddings of each segment.

        Args:
            **kwargs: ``mas_segment_token_ids``: per segment a ``[L_i]`` id tensor (a list, or
                a ``[n, L]`` tensor when vLLM stacked segments of one length).

        Returns:
            List[Tensor]: per segment ``[L_i, dim]`` embeddings, in prompt order.
        """
        segments = kwargs.get(SEGMENT_IDS_KEY)
        if segments is None:
            return []
        embed = self.model.embed_tokens
        # The base table: a LoRA wrapper's per-batch token mapping does not cover these ids (the
        # project's adapters never train embeddings).
        embed = getattr(embed, "base_layer", embed)
        device = embed.weight.device
        return [embed(ids.to(device)) for ids in segments]

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings: Any = None, *, is_multimodal: Any = None) -> torch.Tensor:
        return SupportsMultiModal.embed_input_ids(self, input_ids, multimodal_embeddings, is_multimodal=is_multimodal)


def _mas_model(base: type, name: str) -> type:
    """``base`` with segments, registered with the segment processor."""

    def __init__(self: Any, *, vllm_config: Any, prefix: str = "", **kwargs: Any) -> None:
        base.__init__(self, vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._mas_check(vllm_config)

    cls = type(name, (MasSegmentsMixin, base), {"__init__": __init__, "__doc__": f"{base.__name__} serving MAS prompt segments."})
    return MULTIMODAL_REGISTRY.register_processor(MasSegmentProcessor, info=MasSegmentInfo, dummy_inputs=MasSegmentDummyInputs)(cls)


MasLlamaForCausalLM = _mas_model(LlamaForCausalLM, "MasLlamaForCausalLM")
MasQwen2ForCausalLM = _mas_model(Qwen2ForCausalLM, "MasQwen2ForCausalLM")
MasMistralForCausalLM = _mas_model(MistralForCausalLM, "MasMistralForCausalLM")

#: The plugin's architecture name for each Hugging Face architecture it serves.
ARCHITECTURES = {
    "LlamaForCausalLM": "MasLlamaForCausalLM",
    "Qwen2ForCausalLM": "MasQwen2ForCausalLM",
    "MistralForCausalLM": "MasMistralForCausalLM",
}
