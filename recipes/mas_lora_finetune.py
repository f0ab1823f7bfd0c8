"""MAS LoRA fine-tuning on one device.

    tune run mas_lora_finetune --config llama3_2_1b_mas.yaml [key=value ...]

``attention: mas`` trains with Masked Attention by Segment; ``attention: causal`` is the baseline
on the same data and the same attention path. ``--help`` lists every key with its default.

This module is installed top-level (torchtune's ``tune run NAME`` runs an unregistered recipe
with ``runpy.run_module``); the recipe itself lives in :mod:`mas.training.finetune`.
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
from mas.config import ConfigError, parse, report_user_errors, to_options
from mas.devices import resolve_device
from mas.training.finetune import EXIT_INTERRUPTED, LoRAFinetuneRecipe, TrainingInterrupted, train_to_end
from mas.training.options import FinetuneOptions
from mas.training.parallel import SingleDevice

RECIPE = "mas_lora_finetune"


class MASLoRAFinetuneRecipe(LoRAFinetuneRecipe):
    """The fine-tuning recipe on the single device named by ``device``."""

    def __init__(self, cfg: DictConfig) -> None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size > 1:
            raise ConfigError(
                f"{RECIPE} trains on one device but was launched as {world_size} processes (torchrun "
                "--nproc_per_node); every process would train the same model into one folder. Use "
                "mas_lora_finetune_distributed for several devices, or launch without --nproc_per_node"
            )
        options = to_options(cfg, FinetuneOptions, RECIPE)
        super().__init__(options, SingleDevice(resolve_device(options.device)), cfg, name=RECIPE)


def run(cfg: DictConfig) -> MASLoRAFinetuneRecipe:
    """Set up and train; returns the finished recipe.

    Raises:
        TrainingInterrupted: Ctrl-C, with the step and how to resume.
    """
    return train_to_end(lambda: MASLoRAFinetuneRecipe(cfg))


@parse(RECIPE, FinetuneOptions)
def recipe_main(cfg: DictConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        recipe = report_user_errors(RECIPE, lambda: run(cfg))
    except TrainingInterrupted as e:
        print(f"{RECIPE}: {e}", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    print(f"adapter written to {latest_checkpoint(recipe.output_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(recipe_main())
