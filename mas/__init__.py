"""MAS: Masked Attention by Segment for torchtune models (Katz et al., arXiv 2412.18487)."""

from mas._version import __version__
from mas.attention import MASAttention, use_mas_attention
from mas.block_mask import create_mas_block_mask
from mas.generation import GenerationResult, GenerationSettings, generate
from mas.masks import CAUSAL, PAD, dense_mas_mask, mas_mask_mod
from mas.segments import IGNORE_INDEX, SegmentBuilder, SegmentedSequence

__all__ = [
    "CAUSAL",
    "GenerationResult",
    "GenerationSettings",
    "IGNORE_INDEX",
    "MASAttention",
    "PAD",
    "SegmentBuilder",
    "SegmentedSequence",
    "create_mas_block_mask",
    "dense_mas_mask",
    "generate",
    "mas_mask_mod",
    "use_mas_attention",
]

