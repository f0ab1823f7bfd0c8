"""KV-cache plumbing over torchtune's per-layer ``KVCache`` modules.

torchtune's caches fill slots sequentially (one shared write position per cache). Generation
here lays each batch out in cache *slots* (left padding, or a shared system prefix followed by a
padding gap), masks every slot that holds no token, and passes each token's true position to
RoPE, so a slot layout never changes the numbers.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor, nn

__all__ = ["clear_kv_caches", "kv_caches", "read_prefix", "setup_kv_caches", "write_prefix"]


def kv_caches(model: nn.Module) -> List[nn.Module]:
    """The model's self-attention ``KVCache`` modules, in layer order."""
    from torchtune.modules import KVCache

    return [m for m in model.modules() if isinstance(m, KVCache)]


def setup_kv_caches(model: nn.Module, batch_size: int, max_len: int, dtype: torch.dtype) -> None:
    """(Re)create empty caches of ``batch_size`` rows and ``max_len`` slots."""
    from torchtune.modules.common_utils import delete_kv_caches

    caches = kv_caches(model)
    if caches and caches[0].k_cache.shape[0] == batch_size and caches[0].k_cache.shape[2] == max_len:
        model.reset_caches()
        return
    if caches:
        delete_kv_caches(model)
    device = next(model.parameters()).device
    with device:
        model.setup_caches(batch_size=batch_size, dtype=dtype, decoder_max_seq_len=max_len)


def read_prefix(model: nn.Module, length: int, row: int = 0) -> List[Tuple[Tensor, Tensor]]:
    """Copies of slots ``[0, length)`` of one row of every layer's cache: ``[(k, v)]``, each
    ``[1, n_kv_heads, length, head_dim]``."""
    return [(c.k_cache[row : row + 1, :, :length].clone(), c.v_cache[row : row + 1, :, :length].clone()) for c in kv_caches(model)]


def write_prefix(model: nn.Module, prefix: List[Tuple[Tensor, Tensor]]) -> int:
    """Write a cached prefix into slots ``[0, length)`` of every row and advance the caches.

    Returns:
        int: the prefix length.
    """
    caches = kv_caches(model)
    if len(caches) != len(prefix):
        raise ValueError(f"prefix has {len(prefix)} layers, the model {len(caches)}")
    length = prefix[0][0].shape[2]
    for cache, (k, v) in zip(caches, prefix):
        if int(cache.cache_pos[0]) != 0:
            raise RuntimeError("write_prefix needs empty caches")
        # [1, h, length, d] -> every row of [b, h, max_len, d]
        cache.k_cache[:, :, :length] = k
        cache.v_cache[:, :, :length] = v
        cache.cache_pos.add_(length)
    return length


def clear_kv_caches(model: nn.Module) -> None:
    """Remove the caches (if any): the model runs plain full-sequence forwards again."""
    from torchtune.modules.common_utils import delete_kv_caches

    if kv_caches(model):
        delete_kv_caches(model)
