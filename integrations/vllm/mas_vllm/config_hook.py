"""The config hook of the plugin's architectures (vLLM's ``MODELS_CONFIG_MAP``).

vLLM calls it while it builds its config, in the process that parses the command line (or runs
``LLM(...)``), before the config is sent to the engine and the workers, so what it sets holds
everywhere:

- ``is_mm_prefix_lm`` on: each ``mas_segment`` range is attended bidirectionally;
- a segment is never split over two steps (its first keys depend on its last tokens). vLLM's
  ``disable_chunked_mm_input`` (forced on CUDA and ROCm, not on CPU and XPU; set here too) is
  not enough in vLLM 0.32: the scheduler rolls back a partly scheduled item only when it starts
  after the request's computed tokens (``num_computed_tokens < start_pos`` in
  ``v1/core/sched/scheduler.py``), and a MAS segment usually starts exactly where the previous
  step stopped, so it could be split. Chunked prefill is therefore turned off: every prompt (the
  part not taken from the prefix cache) is prefilled in one step, with a token budget of at
  least ``max_model_len``. Measured: with a budget of 64 tokens and chunked prefill on, a
  15-token segment was prefilled as 10 + 5 tokens and the answer differed from ``mas.generate``;
- and it refuses any tokenizer mode but ``mas`` (``--tokenizer-mode mas``): only the ``mas``
  renderer builds segments; any other would send prompts without them, silently causal. (vLLM
  loads the tokenizer before this hook runs, so the hook cannot choose it.)
"""

from __future__ import annotations

from typing import Any

from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig

__all__ = ["MasConfig"]

logger = init_logger(__name__)


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
        scheduler = vllm_config.scheduler_config
        scheduler.disable_chunked_mm_input = True
        if scheduler.enable_chunked_prefill:
            logger.info("mas-vllm: chunked prefill off, so no prompt segment is split over two steps")
            scheduler.enable_chunked_prefill = False
        context = vllm_config.model_config.max_model_len
        if scheduler.max_num_batched_tokens < context:
            logger.info("mas-vllm: max_num_batched_tokens raised from %d to max_model_len %d (a prompt is prefilled in one step)", scheduler.max_num_batched_tokens, context)
            scheduler.max_num_batched_tokens = context
        scheduler.max_num_encoder_input_tokens = max(scheduler.max_num_encoder_input_tokens, scheduler.max_num_batched_tokens)
        scheduler.encoder_cache_size = max(scheduler.encoder_cache_size, scheduler.max_num_batched_tokens)
