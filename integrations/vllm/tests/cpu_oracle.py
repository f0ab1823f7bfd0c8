"""The CPU test oracle: vLLM's FlexAttention backend, eager, with a CPU-safe KV-cache write.

vLLM's only CPU attention backend (CPU_ATTN) ignores prefix-LM ranges, so it cannot check MAS.
vLLM's FlexAttention backend honours them; on CPU it needs three changes, made here in test
processes only (``LLM`` runs its engine in-process in the tests: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``):

- the CPU platform picks FLEX_ATTENTION instead of CPU_ATTN;
- flex_attention and create_block_mask run uncompiled (compiled flex on CPU trips an assertion
  in torch's ``flex_cpu.py``);
- the KV-cache write is a plain indexed copy (the CPU wheel lacks the CUDA cache-write op).

``vllm serve`` runs its engine in processes it spawns; ``vllm_cli.py`` applies the oracle in
each of them when :data:`ORACLE_ENV` is set (a spawned process re-imports the main script).

This is a test oracle, not a serving path: on CUDA vLLM selects range-aware backends itself.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

__all__ = ["apply_cpu_flex_oracle", "cpu_flex_oracle", "ORACLE_ENV"]

#: Set to ``1`` in the environment of ``vllm_cli.py``: the served processes run the oracle too.
ORACLE_ENV = "MAS_VLLM_TEST_CPU_FLEX"


def _write_kv_cache(self, layer, key, value, kv_cache, slot_mapping) -> None:
    """Each token's key and value into its slot: ``[tokens, heads, head_dim]`` into
    ``[blocks, block_size, heads, head_dim]`` at ``slot // block_size, slot % block_size``."""
    from vllm.v1.attention.backend import AttentionType

    if self.attn_type == AttentionType.ENCODER_ONLY:
        return
    key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
    n = slot_mapping.shape[0]
    slots = slot_mapping.long()
    keep = slots >= 0
    slots, k, v = slots[keep], key[:n][keep], value[:n][keep]
    block_size = key_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    key_cache[blocks, offsets] = k.to(key_cache.dtype)
    value_cache[blocks, offsets] = v.to(value_cache.dtype)


def apply_cpu_flex_oracle() -> Callable[[], None]:
    """From now on, vLLM in this process runs FlexAttention on the CPU (see the module docstring).

    Returns:
        Callable[[], None]: undoes it.
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention import selector
    from vllm.v1.attention.backends import flex_attention as flex
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    # vLLM caches each layer shape's backend choice: forget it on the way in and out.
    selector._cached_get_attn_backend.cache_clear()
    saved = (CpuPlatform.__dict__["get_attn_backend_cls"], flex.flex_attention_compiled, flex.create_block_mask_compiled, flex.FlexAttentionImpl.do_kv_cache_update)
    stock = saved[0].__func__

    def flex_on_cpu(cls, selected_backend, attn_selector_config, num_heads=None):
        if attn_selector_config.use_mla or attn_selector_config.use_sparse:
            return stock(cls, selected_backend, attn_selector_config, num_heads)
        return AttentionBackendEnum.FLEX_ATTENTION.get_path()

    CpuPlatform.get_attn_backend_cls = classmethod(flex_on_cpu)
    flex.flex_attention_compiled = flex_attention
    flex.create_block_mask_compiled = create_block_mask
    flex.FlexAttentionImpl.do_kv_cache_update = _write_kv_cache

    def undo() -> None:
        selector._cached_get_attn_backend.cache_clear()
        CpuPlatform.get_attn_backend_cls = saved[0]
        flex.flex_attention_compiled, flex.create_block_mask_compiled, flex.FlexAttentionImpl.do_kv_cache_update = saved[1:]

    return undo


@contextmanager
def cpu_flex_oracle() -> Iterator[None]:
    """Within the block, vLLM in this process runs FlexAttention on the CPU (see the module docstring)."""
    undo = apply_cpu_flex_oracle()
    try:
        yield
    finally:
        undo()
