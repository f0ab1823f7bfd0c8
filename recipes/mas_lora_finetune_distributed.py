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

import logging
import os
import sys

import mas

if getattr(mas, "__file__", None) is None:  # a plain folder named "mas" in the working directory
    sys.exit(f"a folder named 'mas' in {list(mas.__path__)} shadows the installed mas package; run from another directory")

from omegaconf import DictConfig

from mas.checkpointing import latest_checkpoint
from mas.config import ConfigError, RecipeKeys, parse
from mas.data import DataError
from mas.training.finetune import FINETUNE_KEYS, LoRAFinetuneRecipe
from mas.training.parallel import FSDP2

KEYS = RecipeKeys(
    recipe="mas_lora_finetune_distributed",
    required=FINETUNE_KEYS.required,
    optional={
        **FINETUNE_KEYS.optional,
        "distributed_backend": "auto | nccl | gloo",
        "global_batch_size": "examples per optimizer step over all ranks (sets the per-rank batch_size)",
        "fsdp_cpu_offload": "keep sharded parameters on CPU",
        "fsdp_reshard_after_forward": "free gathered parameters after forward",
    },
)


def _per_rank_batch(cfg: DictConfig, world_size: int) -> None:
    """Derive ``batch_size`` from ``global_batch_size``, refusing sizes that do not divide."""
    global_batch = cfg.get("global_batch_size")
    if global_batch is None:
        return
    accum = int(cfg.get("gradient_accumulation_steps", 1))
    per_step = world_size * accum
    if int(global_batch) % per_step:
        raise ConfigError(
            f"global_batch_size={global_batch} is not divisible by {world_size} ranks x "
            f"gradient_accumulation_steps={accum}"
        )
    cfg.batch_size = int(global_batch) // per_step


class MASLoRAFinetuneDistributedRecipe(LoRAFinetuneRecipe):
    """The fine-tuning recipe on FSDP2 ranks."""

    def __init__(self, cfg: DictConfig) -> None:
        device_type = str(cfg.get("device", "cuda")).split(":")[0]
        if device_type == "auto":
            import torch

            device_type = "cuda" if torch.cuda.is_available() else "cpu"
        parallel = FSDP2(
            device_type,
            cfg.get("distributed_backend", "auto"),
            reshard_after_forward=bool(cfg.get("fsdp_reshard_after_forward", True)),
            cpu_offload=bool(cfg.get("fsdp_cpu_offload", False)),
        )
        _per_rank_batch(cfg, parallel.world_size)
        super().__init__(cfg, parallel, name=KEYS.recipe)


@parse(KEYS)
def recipe_main(cfg: DictConfig) -> int:
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    recipe = None
    try:
        recipe = MASLoRAFinetuneDistributedRecipe(cfg)
        recipe.setup()
        recipe.train()
        recipe.cleanup()
        if recipe.parallel.is_main:
            print(f"adapter written to {latest_checkpoint(recipe.output_dir)}")
    except (ConfigError, DataError) as e:
        raise SystemExit(f"{KEYS.recipe}: {type(e).__name__}: {e}") from None
    finally:
        if recipe is not None:
            recipe.parallel.close()
    return 0


if __name__ == "__main__":
    sys.exit(recipe_main())
