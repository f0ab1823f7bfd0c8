"""Attention dispatch: one mask builder, and torchtune attention layers that take its masks.

:func:`build_attention_mask` is the only place that turns per-token segment ids, an attention
mode (``"mas"`` or ``"causal"``) and a backend into a mask; training, prefill, log-likelihood
scoring and the system-prompt cache all call it. :func:`uses_flex` is the only place that
decides between a FlexAttention ``BlockMask`` and a dense SDPA mask.

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

import functools
import logging
from typing import Literal, Optional, Sequence, Union, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torchtune.modules import MultiHeadAttention

from mas.block_mask import FLEX_TILE, create_mas_block_mask
from mas.compile_budget import CompiledWithBudget, compile_with_budget
from mas.errors import ConfigError
from mas.masks import AttentionMode, as_causal, dense_mas_mask, materialize_mask_mod, validate_attention_mode
from mas.windowed_sdpa import SdpaMask, Window, sdpa_mask_of, windowed_mas_mask, windowed_sdpa

__all__ = [
    "AttentionBackend",
    "AttentionMask",
    "MASAttention",
    "block_mask_to_dense",
    "build_attention_mask",
    "flex_supported",
    "prefill_tile",
    "use_mas_attention",
    "uses_flex",
    "validate_attention_backend",
]

log = logging.getLogger(__name__)

AttentionBackend = Literal["auto", "flex", "sdpa"]
AttentionMask = Union[Tensor, BlockMask]

#: Compiled FlexAttention signatures per process (dynamo's default limit is 8). Lengths bucketed to
#: 128-token tiles up to 4,096 tokens are 32 query lengths; a run that trains and evaluates
#: (grad on and off) at one batch size stays within 64. Past it: one warning, then uncompiled.
FLEX_SHAPE_BUDGET = 64


@functools.lru_cache(maxsize=None)
def _compiled_flex() -> CompiledWithBudget[Tensor]:
    # Built on first use, not at import: importing mas changes no compiler state.
    return compile_with_budget(
        flex_attention,
        name="FlexAttention",
        max_shapes=FLEX_SHAPE_BUDGET,
        fix="pad batches to a multiple of 128 tokens (pad_to_multiple_of: 128) or pack to one length, and keep drop_last",
    )


def _flex(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask, enable_gqa: bool = False) -> Tensor:
    """``flex_attention``, compiled with static shapes and a budget of :data:`FLEX_SHAPE_BUDGET`.

    ``dynamic=False``: a dynamic-shape recompile breaks the CPU kernel in torch 2.13 and costs
    speed on CUDA. Each new shape compiles once; past the budget it warns once and runs
    uncompiled (:mod:`mas.compile_budget`) instead of torch's silent fallback after 8 shapes.
    Inside an already compiled model the call is traced as is.
    """
    if torch.compiler.is_compiling():
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    return _compiled_flex()(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


def block_mask_to_dense(block_mask: BlockMask) -> Tensor:
    """The token-level boolean mask ``[b, q, kv]`` of a BlockMask's ``mask_mod``."""
    q_len, kv_len = block_mask.seq_lengths
    batch_size = block_mask.kv_num_blocks.shape[0]
    device = block_mask.kv_num_blocks.device
    return materialize_mask_mod(block_mask.mask_mod, batch_size, q_len, kv_len, device)


def _sdpa_mask_of(mask: AttentionMask) -> SdpaMask:
    """The SDPA-ready twin of ``mask``, prepared once per batch (cached on the mask).

    A BlockMask pays for its dense twin once, not once per layer; a dense mask is handled by
    :func:`mas.windowed_sdpa.sdpa_mask_of` (CPU masks from :func:`build_attention_mask` arrive
    prepared; a dense mask on a device is prepared as one call over the whole mask, unread).
    """
    if isinstance(mask, BlockMask):
        return sdpa_mask_of(mask, dense=lambda: block_mask_to_dense(mask))
    return sdpa_mask_of(mask)


class MASAttention:
    """Drop-in for torchtune's ``MultiHeadAttention._attention_call``.

    Args:
        backend (str): ``"auto"`` (flex on CUDA, dense SDPA on CPU), ``"flex"`` (always
            compiled flex; on CPU forward only), or ``"sdpa"`` (always dense SDPA).
    """

    def __init__(self, backend: AttentionBackend = "auto") -> None:
        self.backend = validate_attention_backend(backend, key="attention backend")

    def _use_flex(self, q: Tensor, k: Tensor, v: Tensor) -> bool:
        use_flex = uses_flex(self.backend, q.device)
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        if use_flex and needs_grad and q.device.type == "cpu":
            raise RuntimeError(
                "attention backend 'flex' cannot train on CPU: FlexAttention has no CPU "
                "backward in this torch version. Use backend 'auto' (dense SDPA fallback)."
            )
        return use_flex

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
            k (Tensor): ``[b, n_kv, s_kv, h_d]`` (``s_kv`` may be a KV cache's full length;
                ``n_kv`` divides ``n_h``: fewer heads are grouped-query attention, run without
                copies, as ``mas.generation.gqa_attention`` passes them).
            v (Tensor): ``[b, n_kv, s_kv, h_d]``.
            mask (Optional[AttentionMask]): BlockMask with ``seq_lengths == (s_q, <= s_kv)``,
                or bool ``[b, s_q, <= s_kv]``, or None for causal.
            dropout_p (float): attention dropout (SDPA only).
            is_causal (bool): causal attention when ``mask`` is None.

        Returns:
            Tensor: ``[b, n_h, s_q, h_d]``.
        """
        enable_gqa = k.shape[1] != q.shape[1]
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal, enable_gqa=enable_gqa)
        kv_len = mask.seq_lengths[1] if isinstance(mask, BlockMask) else mask.shape[-1]
        if kv_len < k.shape[-2]:
            # KV cache: slots past the mask are unwritten and never attended.
            k, v = k[:, :, :kv_len], v[:, :, :kv_len]
        if isinstance(mask, BlockMask):
            if self._use_flex(q, k, v):
                if dropout_p > 0.0:
                    raise ConfigError("FlexAttention does not support attention dropout; set it to 0")
                return _flex(q, k, v, mask, enable_gqa)
        return windowed_sdpa(q, k, v, _sdpa_mask_of(mask), dropout_p, enable_gqa)


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


def validate_attention_backend(value: object, *, key: str = "attention_backend") -> AttentionBackend:
    """Return ``value`` if it is an :data:`AttentionBackend`, else raise a one-line ``ConfigError``."""
    if value not in get_args(AttentionBackend):
        raise ConfigError(f"{key} must be auto, flex or sdpa, got {value!r}")
    return value  # type: ignore[return-value]


def uses_flex(backend: AttentionBackend, device: torch.device) -> bool:
    """Whether masks on ``device`` are BlockMasks run by FlexAttention (else dense SDPA masks).

    ``"flex"``: always (on CPU forward only); ``"sdpa"``: never; ``"auto"``: where compiled flex
    runs forward and backward (:func:`flex_supported`). The mask builder and the kernel choice
    in :class:`MASAttention` both ask this, so they never disagree.
    """
    backend = validate_attention_backend(backend)
    return backend == "flex" or (backend == "auto" and flex_supported(device))


def prefill_tile(backend: AttentionBackend, device: torch.device) -> int:
    """The multiple a prefill's query length is rounded up to: the flex tile where FlexAttention
    runs (a compiled kernel then sees a few shapes, not one per prompt length), else 0 (none:
    SDPA takes any length, and padding would only add work)."""
    return FLEX_TILE if uses_flex(backend, device) else 0


def build_attention_mask(
    segment_ids: Tensor,
    document_ids: Optional[Tensor] = None,
    *,
    attention: AttentionMode,
    backend: AttentionBackend = "auto",
    query_start: int = 0,
    query_len: Optional[int] = None,
    block_size: int = 128,
    validate: bool = True,
    compile_block_tables: Optional[bool] = None,
    key_windows: Optional[Sequence[Window]] = None,
) -> AttentionMask:
    """The one place a mask is built: training, prefill, scoring and the system-prompt cache.

    The attention mode picks the segment layout (MAS, or the same layout with prompt segments
    made causal); the backend and the device of ``segment_ids`` pick the mask's form: a
    ``BlockMask`` (``O(s)`` build, no ``[s, s]`` tensor) where FlexAttention will run, else the
    dense boolean twin from the same ``mask_mod`` (CPU, ``backend="sdpa"``). Built outside any
    compiled region, once per batch, and shared by every layer. For a query window (prefill
    after a cached prefix) query ``i`` is key position ``query_start + i``.

    Example, a system segment (0), a user segment (1), an answer, one padding slot::

        segment_ids = [0, 0, 1, 1, -1, -2]

        attention="mas"            attention="causal"
          k: 0 1 2 3 4 5             k: 0 1 2 3 4 5
          [1 1 0 0 0 0]              [1 0 0 0 0 0]
          [1 1 0 0 0 0]              [1 1 0 0 0 0]
          [1 1 1 1 0 0]              [1 1 1 0 0 0]
          [1 1 1 1 0 0]              [1 1 1 1 0 0]
          [1 1 1 1 1 0]              [1 1 1 1 1 0]
          [1 1 1 1 1 0]              [1 1 1 1 1 0]

    Args:
        segment_ids (Tensor): ``[b, s]`` segment ids of every key position, on the target device.
        document_ids (Optional[Tensor]): ``[b, s]`` document ids of packed rows, or None.
        attention (AttentionMode): ``"mas"`` or ``"causal"``.
        backend (AttentionBackend): ``"auto"``, ``"flex"`` or ``"sdpa"`` (see :func:`uses_flex`).
        query_start (int): key position of the first query. Default 0.
        query_len (Optional[int]): number of queries; default ``s - query_start``.
        block_size (int): FlexAttention tile size.
        validate (bool): check the ids (a device sync on CUDA); the training loop checks its CPU
            batch instead and passes False.
        compile_block_tables (Optional[bool]): build the BlockMask tables with ``torch.compile``.
            None (default): on CUDA, where the eager build is launch-bound (~2 ms at 8 x 1024 on
            an H200, ~0.2 ms compiled, identical tables: tests/gpu). Callers whose shapes change
            every batch (prefill) pass False: one compile per new shape costs more than it saves.
        key_windows (Optional[Sequence[Window]]): the CPU dense mask's query-tile key windows,
            planned on the CPU batch by :func:`mas.windowed_sdpa.plan_key_windows` (the training
            loader does, so the step reads no id); default: planned here. Ignored elsewhere.

    Returns:
        AttentionMask: ``BlockMask`` with ``seq_lengths == (query_len, s)``, or bool
        ``[b, query_len, s]``.

    Raises:
        ConfigError: for an unknown attention mode or backend.
    """
    attention = validate_attention_mode(attention)
    layout = segment_ids if attention == "mas" else as_causal(segment_ids)
    if not uses_flex(backend, segment_ids.device):
        if segment_ids.device.type != "cpu":
            return dense_mas_mask(layout, document_ids, query_start=query_start, query_len=query_len, validate=validate)
        return windowed_mas_mask(
            layout, document_ids, query_start=query_start, query_len=query_len, validate=validate, key_windows=key_windows
        )
    if compile_block_tables is None:
        compile_block_tables = segment_ids.is_cuda
    return create_mas_block_mask(
        layout,
        document_ids,
        query_start=query_start,
        query_len=query_len,
        block_size=block_size,
        validate=validate,
        compile=compile_block_tables,
    )
