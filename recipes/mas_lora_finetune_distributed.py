"""MAS LoRA fine-tuning on several devices with FSDP2, launched by torchrun.

    tune run --nproc_per_node 2 mas_lora_finetune_distributed --config tiny_mas_distributed
    tune run --nproc_per_node 8 mas_lora_finetune_distributed --config llama3_1_8b_mas_distributed
    # multi-node: torchrun's rendezvous options, e.g.
    tune run --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
        mas_lora_finetune_distributed --config llama3_1_8b_mas_distributed

Each rank builds the MAS BlockMask of its own micro-batch; the model is sharded with PyTorch's
``fully_shard`` (FSDP2); losses are summed over all ranks' target tokens; checkpoints are
gathered to rank 0 in the same PEFT/HF layouts as ``mas_lora_finetune``, and resume works the
same way (with the same number of ranks).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys

import mas

if getattr(mas, "__file__", None) is None:  # a plain folder named "mas" in the working directory
    sys.exit(f"a folder named 'mas' in {list(mas.__path__)} shadows the installed mas package; run from another directory")

import torch
from omegaconf import DictConfig

from mas.checkpointing import latest_checkpoint
from mas.config import ConfigError, parse, report_user_errors, to_options
from mas.training.finetune import EXIT_INTERRUPTED, LoRAFinetuneRecipe, TrainingInterrupted, train_to_end
from mas.training.options import DistributedFinetuneOptions
from mas.training.parallel import FSDP2

RECIPE = "mas_lora_finetune_distributed"


def _per_rank_batch(options: DistributedFinetuneOptions, world_size: int) -> DistributedFinetuneOptions:
    """Derive ``batch_size`` from ``global_batch_size``, refusing sizes that do not divide."""
    if options.global_batch_size is None:
        return options
    per_step = world_size * options.gradient_accumulation_steps
    if options.global_batch_size % per_step:
        raise ConfigError(
            f"global_batch_size={options.global_batch_size} is not divisible by {world_size} ranks x "
            f"gradient_accumulation_steps={options.gradient_accumulation_steps}"
        )
    return dataclasses.replace(options, batch_size=options.global_batch_size // per_step)


class MASLoRAFinetuneDistributedRecipe(LoRAFinetuneRecipe):
    """The fine-tuning recipe on FSDP2 ranks."""

    def __init__(self, cfg: DictConfig) -> None:
        options = to_options(cfg, DistributedFinetuneOptions, RECIPE)
        device_type = options.device.split(":")[0]
        if device_type == "auto":
            device_type = "cuda" if torch.cuda.is_available() else "cpu"
        parallel = FSDP2(
            device_type,
            options.distributed_backend,
            reshard_after_forward=options.fsdp_reshard_after_forward,
            cpu_offload=options.fsdp_cpu_offload,
        )
        super().__init__(_per_rank_batch(options, parallel.world_size), parallel, cfg, name=RECIPE)


def run(cfg: DictConfig) -> None:
    made: list = []  # the recipe, once made: its process group is closed whatever happens
    try:
        recipe = train_to_end(lambda: made.append(MASLoRAFinetuneDistributedRecipe(cfg)) or made[0])
        if recipe.parallel.is_main:
            print(f"adapter written to {latest_checkpoint(recipe.output_dir)}")
    finally:
        for recipe in made:
            recipe.parallel.close()


@parse(RECIPE, DistributedFinetuneOptions)
def recipe_main(cfg: DictConfig) -> int:
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    try:
        report_user_errors(RECIPE, lambda: run(cfg))
    except TrainingInterrupted as e:
        if rank == 0:  # every rank gets the Ctrl-C; one says where it stopped
            print(f"{RECIPE}: {e}", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    return 0


if __name__ == "__main__":
    sys.exit(recipe_main())
