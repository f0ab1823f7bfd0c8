"""The config hook of the plugin's architectures (vLLM's ``MODELS_CONFIG_MAP``).

vLLM calls it while it builds its config, in the process that parses the command line (or runs
``LLM(...)``), before the config is sent to the engine and the workers, so what it sets holds
everywhere:

- ``is_mm_prefix_lm`` on: each ``mas_segment`` range is attended bidirectionally;
- ``disable_chunked_mm_input``: a segment is never split over two steps (its first keys depend
  on its last tokens; vLLM forces this on CUDA and ROCm, not on CPU and XPU);
- and it refuses any tokenizer mode but ``mas`` (``--tokenizer-mode mas``): only the ``mas``
  renderer builds segments; any other would send prompts without them, silently causal. (vLLM
  loads the tokenizer before this hook runs, so the hook cannot choose it.)
"""

from __future__ import annotations

from typing import Any

from vllm.model_executor.models.config import VerifyAndUpdateConfig

__all__ = ["MasConfig"]


class MasConfig(VerifyAndUpdateConfig):
    """vLLM's per-architecture config hook (see the module docstring)."""

    @staticmethod
    def verify_and_update_model_config(model_config: Any) -> None:
        model_config.hf_config.is_mm_prefix_lm = True
        model_config.model_arch_config = model_config.get_model_arch_config()
        if model_config.tokenizer_mode != "mas":
            raise ValueError(
                f"mas-vllm: {model_config.architecture} needs --tokenizer-mode mas (LLM(tokenizer_mode='mas')), got "
                f"{model_config.tokenizer_mode!r}: only the mas renderer builds prompt segments"
            )

    @staticmethod
    def verify_and_update_config(vllm_config: Any) -> None:
        vllm_config.scheduler_config.disable_chunked_mm_input = True
