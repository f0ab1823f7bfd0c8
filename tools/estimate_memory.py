"""Expected GPU memory of the paper's eight fine-tuning runs: computed, not measured.

Parameters are counted by building each config's model on the meta device (no memory, no
download); the NF4 sizes come from torchao's own NF4 tensors built the same way. Everything
else is arithmetic, stated here so it can be checked:

* Weights: bf16 (2 bytes/parameter). QLoRA (the launch line in each config's header): the
  decoder layers' linear weights in NF4 (torchao: 4-bit codes, an int8 scaler per 64 values, an
  fp32 factor per 256 scalers: ~0.516 byte/param), sized from the NF4 tensors themselves;
  embeddings, the output projection, biases and norms stay bf16 (torchtune does not quantize them).
* LoRA (r=32 on q_proj, v_proj): parameters and gradients in bf16 (2 + 2 bytes) and AdamW's two
  moments counted in fp32 (8 bytes): an upper bound, since torch keeps them in the parameter
  dtype (bf16).
* Activations saved for backward, bf16, batch ``b`` x ``s`` tokens (T = b * s), per token and
  decoder layer (h: model width, I: MLP width), without activation checkpointing::

      8h   two RMSNorm inputs, upcast to fp32 by torchtune's RMSNorm (4 bytes x h, twice)
      8h   q, k, v and the attention output (bf16; torchtune expands GQA k/v to all heads)
      3h   per LoRA module: dropout output feeding lora_a (bf16) + dropout mask (1 byte)
      6I   w1 and w3 outputs and silu(w1) for the SwiGLU backward (bf16)

  plus, once, ``6V`` bytes per token for the logits (bf16) and the fp32 log-probabilities the
  chunked cross-entropy keeps for backward (V: vocabulary). With activation checkpointing each
  layer keeps only its bf16 input (2h per token and layer) and one layer's activations exist
  at a time during the recomputation.
* Buffers (RoPE caches) as built: torchtune's Qwen2 builders give every layer its own fp32
  cache over the full context (131072 positions for Qwen2.5-7B: 3.5 GiB).
* QLoRA through ``mas.models.qlora_qwen2_5_*``: torchtune builds the projections without an
  adapter in bf16 before they are swapped to NF4, so building peaks at about the bf16 model; the
  figure is the larger of that and the training step.
* Plus a fixed 1 GiB for the CUDA context, cuBLAS workspaces and allocator slack.

The figures in parentheses were measured once on an H200 by ``tools/measure_memory.py``
(``MEASURED_H200``); they exclude the CUDA context that the computed figures include.

Flex attention never materializes the ``s x s`` scores, so activations grow linearly in ``s``.

Usage::

    python tools/estimate_memory.py            # print the table, write docs/model_table.md
    python tools/estimate_memory.py --no-write # print only
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import torch

REPO = Path(__file__).resolve().parents[1]
TABLE_FILE = REPO / "docs" / "model_table.md"
GIB = 1024**3
OVERHEAD_BYTES = 1 * GIB

def paper_models() -> Dict[str, str]:
    """The paper's models from ``configs/models/`` (data, not a list kept here): name -> title."""
    from mas.config import bundled_models

    return {m.name: m.about["title"] for m in bundled_models() if m.about.get("hf_id")}


# Peak torch.cuda.max_memory_allocated (GiB) from `python tools/measure_memory.py`, run once on one
# H200 (torch 2.11, torchtune 0.6.1, torchao 0.15, flex attention; random weights, three MAS steps;
# includes building the model, excludes the CUDA context). Key: (config, qlora, AC, batch).
MEASURED_H200 = {
    ("llama3_8b_mas", False, False, 8): 27.6, ("llama3_8b_mas", False, True, 8): 17.4,
    ("llama3_8b_mas", True, False, 8): 17.9, ("llama3_8b_mas", True, True, 8): 7.7,
    ("llama3_1_8b_mas", False, False, 8): 27.5, ("llama3_1_8b_mas", False, True, 8): 17.3,
    ("llama3_1_8b_mas", True, False, 8): 17.9, ("llama3_1_8b_mas", True, True, 8): 7.6,
    ("llama3_2_1b_mas", False, False, 8): 6.9, ("llama3_2_1b_mas", False, True, 8): 4.2,
    ("llama3_2_1b_mas", True, False, 8): 5.5, ("llama3_2_1b_mas", True, True, 8): 2.8,
    ("llama3_2_3b_mas", False, False, 8): 14.0, ("llama3_2_3b_mas", False, True, 8): 8.1,
    ("llama3_2_3b_mas", True, False, 8): 10.1, ("llama3_2_3b_mas", True, True, 8): 4.2,
    ("mistral_7b_v0_1_mas", False, False, 8): 25.3, ("mistral_7b_v0_1_mas", False, True, 8): 15.1,
    ("mistral_7b_v0_1_mas", True, False, 8): 16.1, ("mistral_7b_v0_1_mas", True, True, 8): 6.2,
    ("mistral_7b_v0_3_mas", False, False, 8): 25.3, ("mistral_7b_v0_3_mas", False, True, 8): 15.2,
    ("mistral_7b_v0_3_mas", True, False, 8): 16.1, ("mistral_7b_v0_3_mas", True, True, 8): 6.2,
    ("qwen2_5_3b_mas", False, False, 8): 16.7, ("qwen2_5_3b_mas", False, True, 8): 9.3,
    ("qwen2_5_3b_mas", True, False, 8): 12.8, ("qwen2_5_3b_mas", True, True, 8): 7.0,
    ("qwen2_5_7b_mas", False, False, 8): 30.0, ("qwen2_5_7b_mas", False, True, 8): 20.2,
    ("qwen2_5_7b_mas", True, False, 8): 21.0, ("qwen2_5_7b_mas", True, True, 8): 17.6,
    ("llama3_2_1b_mas_1024", False, False, 8): 20.3, ("llama3_2_1b_mas_1024", False, False, 4): 11.4,
    ("llama3_2_1b_mas_1024", False, True, 8): 9.3,
    ("llama3_2_3b_mas_1024", False, False, 8): 37.5, ("llama3_2_3b_mas_1024", False, False, 4): 21.8,
    ("llama3_2_3b_mas_1024", False, True, 8): 13.9,
    ("qwen2_5_3b_mas_1024", False, False, 8): 45.2, ("qwen2_5_3b_mas_1024", False, False, 4): 26.2,
    ("qwen2_5_3b_mas_1024", False, True, 8): 15.8,
}  # fmt: skip


@dataclass
class ModelSize:
    """What the memory arithmetic needs about one model."""

    params: int  # base parameters (LoRA excluded)
    lora_params: int
    lora_modules: int  # adapted projections per layer
    nf4_bytes: int  # QLoRA: bytes of the base weights (NF4 linears + bf16 rest)
    buffer_bytes: int  # RoPE caches (torchtune's Qwen2 keeps one per layer)
    qlora_build_bytes: int  # QLoRA: weights that exist in bf16 while the model is built
    layers: int
    dim: int
    hidden: int
    vocab: int


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _nf4_nbytes(t: torch.Tensor) -> int:
    names, _ = t.__tensor_flatten__()
    return sum(_nbytes(getattr(t, n)) for n in names)


def measure_model(model_cfg, qlora_model_cfg) -> ModelSize:
    """Count parameters of a LoRA model config and of its QLoRA variant on the meta device."""
    from torchao.dtypes.nf4tensor import NF4Tensor
    from torchtune import training
    from torchtune.modules.peft import get_adapter_params

    from mas.config import instantiate

    def build(node):
        with training.set_default_dtype(torch.bfloat16), torch.device("meta"):
            return instantiate(node)

    model = build(model_cfg)
    adapters = get_adapter_params(model)
    lora = sum(p.numel() for p in adapters.values())
    total = sum(p.numel() for p in model.parameters())
    qmodel = build(qlora_model_cfg)
    nf4 = sum(
        _nf4_nbytes(p) if isinstance(p, NF4Tensor) else _nbytes(p)
        for name, p in qmodel.named_parameters()
        if name not in adapters
    )
    buffers = sum(_nbytes(b) for b in model.buffers())
    # Builders that quantize after building (mas.models.quantize_frozen_linears) hold every
    # projection without an adapter in bf16 first; torchtune's own quantize each one at once.
    build = 2 * (total - lora) if getattr(qmodel, "_mas_quantized_after_build", False) else 0
    attn = model.layers[0].attn
    return ModelSize(
        params=total - lora,
        lora_params=lora,
        lora_modules=len([k for k in adapters if k.startswith("layers.0.") and ".lora_a." in k]),
        nf4_bytes=nf4,
        buffer_bytes=buffers,
        qlora_build_bytes=build,
        layers=len(model.layers),
        dim=attn.embed_dim,
        hidden=model.layers[0].mlp.w1.out_features,
        vocab=model.tok_embeddings.num_embeddings,
    )


def activation_bytes(m: ModelSize, batch: int, seq: int, checkpointing: bool) -> int:
    """Saved activations of one training step (see the module docstring for the formula)."""
    tokens = batch * seq
    per_layer = 8 * m.dim + 8 * m.dim + 3 * m.dim * m.lora_modules + 6 * m.hidden
    logits = 6 * m.vocab
    if checkpointing:
        return tokens * (2 * m.dim * m.layers + per_layer + logits)
    return tokens * (per_layer * m.layers + logits)


def lora_state_bytes(m: ModelSize) -> int:
    return m.lora_params * (2 + 2 + 8)


def training_bytes(m: ModelSize, *, qlora: bool, checkpointing: bool, batch: int = 8, seq: int = 256) -> int:
    weights = (m.nf4_bytes if qlora else 2 * m.params) + m.buffer_bytes
    step = weights + lora_state_bytes(m) + activation_bytes(m, batch, seq, checkpointing)
    build = m.qlora_build_bytes + m.buffer_bytes if qlora else 0
    return max(step, build) + OVERHEAD_BYTES


def download_command(key: str) -> str:
    from mas.config import bundled_models

    return next(m.about.get("download", "?") for m in bundled_models() if m.name == key)


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def _cell(m: ModelSize, config: str, *, qlora: bool, checkpointing: bool, batch: int = 8, seq: int = 256) -> str:
    """Computed GiB, then the H200 measurement in parentheses where there is one."""
    computed = _gib(training_bytes(m, qlora=qlora, checkpointing=checkpointing, batch=batch, seq=seq))
    measured = MEASURED_H200.get((config, qlora, checkpointing, batch))
    return computed if measured is None else f"{computed} ({measured:.1f})"


def build_tables() -> str:
    from mas.config import bundled_experiments, load_config

    rows: List[str] = []
    long_rows: List[str] = []
    sizes: Dict[str, ModelSize] = {}
    experiments = bundled_experiments()
    for key, display in paper_models().items():
        name = f"{key}_mas"
        qlora_cfg = load_config(f"{name}_qlora")  # the model file's QLoRA variant
        m = sizes[key] = measure_model(load_config(name).model, qlora_cfg.model)
        configs = sorted(c for c in experiments if re.fullmatch(rf"{key}_(mas|causal)(_\d+)?", c))
        rows.append(
            f"| {display} | {', '.join(f'`{c}`' for c in configs)} | `{download_command(key)}` "
            f"| {m.params / 1e9:.2f}B | {m.lora_params / 1e6:.1f}M "
            f"| {_cell(m, name, qlora=False, checkpointing=False)} "
            f"| {_cell(m, name, qlora=False, checkpointing=True)} "
            f"| {_cell(m, name, qlora=True, checkpointing=False)} "
            f"| {_cell(m, name, qlora=True, checkpointing=True)} |"
        )
        long_name = f"{key}_mas_1024"
        if long_name in experiments:
            long_rows.append(
                f"| {display} | `{long_name}`, `{key}_causal_1024` "
                f"| {_cell(m, long_name, qlora=False, checkpointing=False, seq=1024)} "
                f"| {_cell(m, long_name, qlora=False, checkpointing=False, batch=4, seq=1024)} "
                f"| {_cell(m, long_name, qlora=False, checkpointing=True, seq=1024)} |"
            )
    example = sizes["llama3_8b"]
    breakdown = (
        f"Llama-3-8B, bf16 LoRA at 8 x 256: weights {_gib(2 * example.params)} GiB, LoRA + AdamW "
        f"{_gib(lora_state_bytes(example))} GiB, activations {_gib(activation_bytes(example, 8, 256, False))} GiB "
        f"({_gib(activation_bytes(example, 8, 256, True))} GiB with activation checkpointing), "
        f"QLoRA weights {_gib(example.nf4_bytes)} GiB, overhead {_gib(OVERHEAD_BYTES)} GiB. "
        f"Qwen2.5-7B's per-layer RoPE caches: {_gib(sizes['qwen2_5_7b'].buffer_bytes)} GiB."
    )
    header = (
        "# The paper's eight models: configs, downloads and expected GPU memory\n\n"
        "Memory is **computed** (`python tools/estimate_memory.py`, which writes this file; in "
        "parentheses: the peak measured once on an H200 with random weights, see `MEASURED_H200` in the script): "
        "parameters are counted by building each config's model on the meta device; the formula "
        "(bf16 weights or NF4 for QLoRA, RoPE caches, LoRA r=32 on q/v with AdamW, activations at batch "
        "8 x 256 tokens, 1 GiB CUDA overhead) is in the script's docstring. Real peaks also depend on the "
        "allocator's fragmentation and on `compile`. AC: `enable_activation_checkpointing=True`. "
        "QLoRA: the override in each config's header.\n\n"
        f"{breakdown}\n\n"
        "| Model | Configs | Download | Params | LoRA params | bf16 LoRA (GiB) | bf16 LoRA + AC (GiB) "
        "| QLoRA (GiB) | QLoRA + AC (GiB) |\n"
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    )
    long_table = (
        "\n\n## The 1024-token cutoff (Table 2)\n\n"
        "Activations grow linearly with the sequence (flex attention keeps no `s x s` scores).\n\n"
        "| Model | Configs | bf16 LoRA, batch 8 (GiB) | batch 4 x 2 accumulation (GiB) | batch 8 + AC (GiB) |\n"
        "| --- | --- | ---: | ---: | ---: |\n"
    )
    return header + "\n".join(rows) + long_table + "\n".join(long_rows) + "\n"


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print only, do not write docs/model_table.md")
    args = parser.parse_args(argv)
    table = build_tables()
    print(table)
    if not args.no_write:
        TABLE_FILE.parent.mkdir(parents=True, exist_ok=True)
        TABLE_FILE.write_text(table)
        print(f"written to {TABLE_FILE.relative_to(REPO)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
