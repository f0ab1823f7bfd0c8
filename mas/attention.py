"""Attention dispatch: let every torchtune attention layer take a MAS ``BlockMask`` or dense mask.

torchtune's ``MultiHeadAttention`` calls ``self._attention_call(q, k, v, mask=..., dropout_p=...,
is_causal=...)``. :func:`use_mas_attention` replaces that callable on every attention layer with a
:class:`MASAttention`, which picks the kernel per call:

==========================  ==========================================================
mask                        kernel
==========================  ==========================================================
``BlockMask``, CUDA         compiled ``flex_attention`` (forward and backward)
``BlockMask``, CPU          SDPA with the dense mask of the same ``mask_mod`` (flex has
                            no CPU backward in torch 2.13; ``backend="flex"`` forces the
                            compiled CPU forward for inference)
dense bool ``[b, q, kv]``   SDPA
``None``                    SDPA, causal (torchtune's default)
==========================  ==========================================================

Queries whose row allows no key (left padding) get a zero output on every path, as
FlexAttention gives, instead of SDPA's NaN. When the keys are a KV cache longer than the mask,
the unwritten tail beyond the mask is sliced off (it is never attended).
"""

from __future__ import annotations

import logging
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from mas.masks import materialize_mask_mod

__all__ = [
    "AttentionBackend",
    "MASAttention",
    "block_mask_to_dense",
    "create_attention_mask",
    "flex_supported",
    "use_mas_attention",
]

log = logging.getLogger(__name__)

AttentionBackend = Literal["auto", "flex", "sdpa"]
AttentionMask = Union[Tensor, BlockMask]

_compiled_flex = None


def _flex(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask) -> Tensor:
    """``flex_attention``, compiled once per process with static shapes.

    ``dynamic=False``: a dynamic-shape recompile breaks the CPU kernel in torch 2.13 and costs
    speed on CUDA. Inside an already compiled model the call is traced as is.
    """
    global _compiled_flex
    if torch.compiler.is_compiling():
        return flex_attention(q, k, v, block_mask=block_mask)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask)


def block_mask_to_dense(block_mask: BlockMask) -> Tensor:
    """The token-level boolean mask ``[b, q, kv]`` of a BlockMask's ``mask_mod``."""
    q_len, kv_len = block_mask.seq_lengths
    batch_size = block_mask.kv_num_blocks.shape[0]
    device = block_mask.kv_num_blocks.device
    return materialize_mask_mod(block_mask.mask_mod, batch_size, q_len, kv_len, device)


def _sdpa_ready(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(SDPA mask ``[b, 1, q, kv]``, rows with at least one key ``[b, 1, q, 1]``).

    Rows that allow no key (left-padding queries) attend everywhere for a finite softmax; their
    output is zeroed afterwards, which is what FlexAttention returns for them.
    """
    row_has_key = mask.any(-1, keepdim=True)  # [b, q, 1]
    return (mask | ~row_has_key)[:, None], row_has_key[:, None]


def _sdpa_ready_from_block_mask(block_mask: BlockMask) -> tuple[Tensor, Tensor]:
    # Cached on the BlockMask: a batch pays for the dense twin once, not once per layer.
    cached = getattr(block_mask, "_mas_sdpa_mask", None)
    if cached is None:
        cached = _sdpa_ready(block_mask_to_dense(block_mask))
        block_mask._mas_sdpa_mask = cached
    return cached


def _sdpa_with_mask(
    q: Tensor, k: Tensor, v: Tensor, sdpa_mask: Tensor, row_has_key: Tensor, dropout_p: float
) -> Tensor:
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, dropout_p=dropout_p)
    return out * row_has_key.to(out.dtype)


class MASAttention:
    """Drop-in for torchtune's ``MultiHeadAttention._attention_call``.

    Args:
        backend (str): ``"auto"`` (flex on CUDA, dense SDPA on CPU), ``"flex"`` (always
            compiled flex; on CPU forward only), or ``"sdpa"`` (always dense SDPA).
    """

    def __init__(self, backend: AttentionBackend = "auto") -> None:
        if backend not in ("auto", "flex", "sdpa"):
            raise ValueError(f"attention backend must be auto, flex or sdpa, got {backend!r}")
        self.backend = backend

    def _use_flex(self, q: Tensor, k: Tensor, v: Tensor) -> bool:
        if self.backend == "sdpa":
            return False
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        if q.device.type == "cpu":
            if self.backend == "flex" and needs_grad:
                raise RuntimeError(
                    "attention backend 'flex' cannot train on CPU: FlexAttention has no CPU "
                    "backward in this torch version. Use backend 'auto' (dense SDPA fallback)."
                )
            return self.backend == "flex"
        return self.backend == "flex" or flex_supported(q.device)

    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Optional[AttentionMask],
        dropout_p: float,
        is_causal: bool,
    ) -> Tensor:
        """
        Args:
            q (Tensor): ``[b, n_h, s_q, h_d]``.
            k (Tensor): ``[b, n_h, s_kv, h_d]`` (``s_kv`` may be a KV cache's full length).
            v (Tensor): ``[b, n_h, s_kv, h_d]``.
            mask (Optional[AttentionMask]): BlockMask with ``seq_lengths == (s_q, <= s_kv)``,
                or bool ``[b, s_q, <= s_kv]``, or None for causal.
            dropout_p (float): attention dropout (SDPA only).
            is_causal (bool): causal attention when ``mask`` is None.

        Returns:
            Tensor: ``[b, n_h, s_q, h_d]``.
        """
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal)
        kv_len = mask.seq_lengths[1] if isinstance(mask, BlockMask) else mask.shape[-1]
        if kv_len < k.shape[-2]:
            # KV cache: slots past the mask are unwritten and never attended.
            k, v = k[:, :, :kv_len], v[:, :, :kv_len]
        if isinstance(mask, BlockMask):
            if self._use_flex(q, k, v):
                if dropout_p > 0.0:
                    raise ValueError("FlexAttention does not support attention dropout; set it to 0")
                return _flex(q, k, v, mask)
            sdpa_mask, row_has_key = _sdpa_ready_from_block_mask(mask)
        else:
            sdpa_mask, row_has_key = _sdpa_ready(mask)
        return _sdpa_with_mask(q, k, v, sdpa_mask, row_has_key, dropout_p)


def use_mas_attention(model: nn.Module, backend: AttentionBackend = "auto") -> nn.Module:
    """Make every attention layer of a torchtune model accept MAS masks.

    After this call ``model(tokens, mask=block_mask_or_dense_mask, input_pos=...)`` runs MAS
    attention on CPU and CUDA. The model is changed in place and returned.

    Args:
        model (nn.Module): a torchtune ``TransformerDecoder`` (LoRA or not, sharded or not).
        backend (str): see :class:`MASAttention`.

    Returns:
        nn.Module: ``model``.

    Raises:
        ValueError: if the model has no torchtune attention layer.
    """
    from torchtune.modules import MultiHeadAttention

    layers = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no torchtune MultiHeadAttention layer")
    dispatch = MASAttention(backend)
    for layer in layers:
        # A plain callable attribute, as torchtune sets it: state dicts stay unchanged.
        layer._attention_call = dispatch
    return model


def flex_supported(device: torch.device) -> bool:
    """Whether compiled FlexAttention can run forward *and* backward on ``device``."""
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= (7, 5)


def create_attention_mask(
    segment_ids: Tensor,
    document_ids: Optional[Tensor] = None,
    *,
    backend: AttentionBackend = "auto",
    block_size: int = 128,
    validate: bool = True,
) -> AttentionMask:
    """The mask a training step should pass to the model: built once per batch, shared by layers.

    A ``BlockMask`` (``O(s)`` build, no ``[s, s]`` tensor) where FlexAttention will run; else the
    dense boolean ``[b, s, s]`` twin from the same ``mask_mod`` (CPU training, ``backend="sdpa"``),
    built here, outside any compiled region.

    Args:
        segment_ids (Tensor): ``[b, s]`` on the target device.
        document_ids (Optional[Tensor]): ``[b, s]`` or None.
        backend (str): ``"auto"``, ``"flex"`` or ``"sdpa"`` (see :class:`MASAttention`).
        block_size (int): FlexAttention tile size.
        validate (bool): check the ids (see :func:`mas.create_mas_block_mask`).

    Returns:
        BlockMask or Tensor.
    """
    from mas.block_mask import create_mas_block_mask
    from mas.masks import dense_mas_mask

    use_flex = backend == "flex" or (backend == "auto" and flex_supported(segment_ids.device))
    if use_flex:
        # On CUDA the eager builder is launch-bound (~2 ms at 8 x 1024 on an H200); its compiled
        # graph takes ~0.2 ms and gives identical tables (tests/gpu).
        return create_mas_block_mask(
            segment_ids, document_ids, block_size=block_size, validate=validate, compile=segment_ids.is_cuda
        )
    return dense_mas_mask(segment_ids, document_ids)
