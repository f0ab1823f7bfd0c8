"""mas-vllm: serve MAS (Masked Attention by Segment, arXiv 2412.18487) models on vLLM.

vLLM loads :func:`register` in every process it starts (entry point group
``vllm.general_plugins``). It registers:

- the architectures ``MasLlamaForCausalLM``, ``MasQwen2ForCausalLM``, ``MasMistralForCausalLM``
  (:mod:`mas_vllm.models`), chosen with ``--hf-overrides '{"architectures": [...]}'``, and their
  config hook (prefix-LM ranges on, segments never chunked, the ``mas`` tokenizer mode);
- the tokenizer mode and renderer ``mas`` (:mod:`mas_vllm.tokenizer`, :mod:`mas_vllm.renderer`):
  prompts are built by the project's ``SegmentBuilder``, each prompt segment one range.
  The renderer also makes each request run under the attention mode of the adapter it names
  (:mod:`mas_vllm.policy`).

Nothing is imported from vLLM's model code until a process needs it (the registry takes
``module:Class`` strings), so the API server starts as fast as without the plugin.
"""

from __future__ import annotations

__all__ = ["register"]

_MODELS = {
    "MasLlamaForCausalLM": "mas_vllm.models:MasLlamaForCausalLM",
    "MasQwen2ForCausalLM": "mas_vllm.models:MasQwen2ForCausalLM",
    "MasMistralForCausalLM": "mas_vllm.models:MasMistralForCausalLM",
}


def register() -> None:
    """Register the plugin's architectures, config hook, tokenizer mode and renderer with vLLM."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.renderers.registry import RENDERER_REGISTRY
    from vllm.tokenizers.registry import TokenizerRegistry

    for name, target in _MODELS.items():
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, target)
    from mas_vllm.config_hook import MasConfig

    for name in _MODELS:
        MODELS_CONFIG_MAP[name] = MasConfig
    if "mas" not in TokenizerRegistry.tokenizers:
        TokenizerRegistry.register("mas", "mas_vllm.tokenizer", "MasTokenizer")
    if "mas" not in RENDERER_REGISTRY.renderers:
        RENDERER_REGISTRY.register("mas", "mas_vllm.renderer", "MasRenderer")
