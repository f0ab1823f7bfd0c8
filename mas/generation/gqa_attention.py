"""Grouped-query attention without copies of the keys and values, for inference.

torchtune's ``MultiHeadAttention.forward`` expands the keys and values from ``n_kv`` to ``n_h``
heads before the attention call (``expand(...).flatten(1, 2)``, a copy). During decoding that
copy covers the whole KV cache, in every layer, for every token: on a Llama-3.2-1B shape (32
query heads, 8 KV heads) it is most of the attention's memory traffic. Here the same layer
hands the ``n_kv``-head keys and values to :class:`mas.attention.MASAttention`, which runs the
kernel with ``enable_gqa=True`` (each group of ``n_h / n_kv`` query heads reads its one KV head).

Its cache is the engine's slot cache (:mod:`mas.generation.slot_cache`), whose write reads
nothing from the device (torchtune's ``KVCache.update`` asserts on a device tensor: a host read in
every layer for every token). The layer keeps its parameters, buffers and state dict; :func:`native_gqa_attention` switches the
layers' class for the duration of a ``with`` block (generation), and back.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional

from torch import Tensor, nn
from torchtune.modules import MultiHeadAttention

from mas.attention import AttentionMask, MASAttention

__all__ = ["NativeGQAMultiHeadAttention", "native_gqa_attention"]


class NativeGQAMultiHeadAttention(MultiHeadAttention):
    """torchtune's ``MultiHeadAttention`` with the keys and values left at ``n_kv`` heads.

    Only installed (by :func:`native_gqa_attention`) on layers whose attention call is a
    :class:`MASAttention`, which accepts ``n_kv < n_h`` heads.
    """

    def forward(self, x: Tensor, y: Optional[Tensor] = None, *, mask: Optional[AttentionMask] = None, input_pos: Optional[Tensor] = None) -> Tensor:
        """Same contract as ``MultiHeadAttention.forward``.

        Args:
            x (Tensor): ``[b, s_x, d]`` queries' input.
            y (Optional[Tensor]): ``[b, s_y, d]`` keys' and values' input (self-attention: ``x``);
                None to attend to the KV cache alone.
            mask (Optional[AttentionMask]): as for ``MultiHeadAttention``.
            input_pos (Optional[Tensor]): ``[b, s_x]`` positions.

        Returns:
            Tensor: ``[b, s_x, d]``.
        """
        b, s_x, _ = x.shape
        # [b, s_x, n_h * h_d] -> [b, s_x, n_h, h_d]
        q = self.q_proj(x).view(b, s_x, self.num_heads, self.head_dim)
        if self.pos_embeddings is not None:
            q = self.pos_embeddings(q, input_pos=input_pos)
        q = q.transpose(1, 2)  # [b, n_h, s_x, h_d]
        if self.q_norm is not None:
            q = self.q_norm(q)
        if y is None:
            if self.kv_cache is None or not self.cache_enabled:
                raise ValueError("Must provide y input or use kv_cache to enable streaming decoding")
            k, v = self.kv_cache.k_cache, self.kv_cache.v_cache
        else:
            s_y = y.shape[1]
            # [b, s_y, n_kv * h_d] -> [b, s_y, n_kv, h_d]
            k = self.k_proj(y).view(b, s_y, self.num_kv_heads, self.head_dim)
            v = self.v_proj(y).view(b, s_y, self.num_kv_heads, self.head_dim)
            if self.pos_embeddings is not None:
                k = self.pos_embeddings(k, input_pos=input_pos)
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # [b, n_kv, s_y, h_d]
            if self.k_norm is not None:
                k = self.k_norm(k)
            if self.kv_cache is not None and self.cache_enabled:
                k, v = self.kv_cache.update(k, v)
        # k, v stay [b, n_kv, s, h_d]: the attention call groups the query heads.
        output = self._attention_call(
            q,
            k,
            v,
            mask=mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=self.kv_cache is None and mask is None and self.is_causal,
        )
        # [b, n_h, s_x, h_d] -> [b, s_x, n_h * h_d]
        return self.output_proj(output.transpose(1, 2).reshape(b, s_x, -1))


@contextlib.contextmanager
def native_gqa_attention(model: nn.Module) -> Iterator[int]:
    """Run the model's grouped-query attention layers without K/V copies inside the block.

    Switches every plain torchtune ``MultiHeadAttention`` whose attention call is a
    :class:`MASAttention` (other layers, e.g. a class an FSDP wrapper made, keep theirs) and
    switches them back on exit. Nested use is a no-op.

    Yields:
        int: the number of layers switched.
    """
    switched: List[nn.Module] = [
        m
        for m in model.modules()
        if type(m) is MultiHeadAttention and isinstance(m._attention_call, MASAttention)
    ]
    for layer in switched:
        layer.__class__ = NativeGQAMultiHeadAttention
    try:
        yield len(switched)
    finally:
        for layer in switched:
            layer.__class__ = MultiHeadAttention
