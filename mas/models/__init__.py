"""Model builders for configs' ``_component_`` dotpaths, beyond what torchtune 0.6.1 ships.

The paper fine-tunes Llama 3 / 3.1 / 3.2, Mistral 7B v0.1 / v0.3 and Qwen2.5 base models.
torchtune builds all of them except Mistral-7B-v0.3 (:func:`lora_mistral_7b_v0_3`); its Qwen2
QLoRA quantizes only the adapted projections (:func:`qlora_qwen2_5_3b` and
:func:`qlora_qwen2_5_7b_base` quantize all of them, as its Llama and Mistral QLoRA do). The
``tiny_*`` configs run the embedded demo model (:func:`lora_tiny_llama3_2`,
:func:`tiny_llama3_tokenizer`, :func:`tiny_hf_checkpointer`): a tiny Llama 3.2 written on first
use as a Hugging Face checkpoint.

Test stand-ins of every family live in :mod:`mas.testing`, never here.
"""

from mas.models._hf_layout import hf_config, to_hf_state, write_hf_model
from mas.models._mistral import MISTRAL_7B_V0_3, lora_mistral_7b_v0_3, mistral_7b_v0_3, qlora_mistral_7b_v0_3
from mas.models._quantize import lora_with_nf4_base, quantize_frozen_linears
from mas.models._qwen2 import qlora_qwen2_5_3b, qlora_qwen2_5_7b_base
from mas.models._tiny import (
    TINY_LLAMA3_2,
    lora_tiny_llama3_2,
    pretrain_tiny_model,
    tiny_hf_checkpointer,
    tiny_llama3_2,
    tiny_llama3_tokenizer,
    write_tiny_hf_checkpoint,
)

__all__ = [
    "MISTRAL_7B_V0_3",
    "TINY_LLAMA3_2",
    "hf_config",
    "lora_mistral_7b_v0_3",
    "lora_tiny_llama3_2",
    "lora_with_nf4_base",
    "mistral_7b_v0_3",
    "pretrain_tiny_model",
    "qlora_mistral_7b_v0_3",
    "qlora_qwen2_5_3b",
    "qlora_qwen2_5_7b_base",
    "quantize_frozen_linears",
    "tiny_hf_checkpointer",
    "tiny_llama3_2",
    "tiny_llama3_tokenizer",
    "to_hf_state",
    "write_hf_model",
    "write_tiny_hf_checkpoint",
]
