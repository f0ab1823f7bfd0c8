"""MAS LoRA fine-tuning on one device.

    tune run mas_lora_finetune --config llama3_2_1b_mas.yaml [key=value ...]

``attention: mas`` trains with Masked Attention by Segment; ``attention: causal`` is the baseline
on the same data and the same attention path. See ``configs/`` for every option.

This module is installed top-level (torchtune's ``tune run NAME`` runs an unregistered recipe
with ``runpy.run_module``); the recipe itself lives in :mod:`mas.training.finetune`.
"""

from __future__ import annotations

import logging
import sys

import mas

if getattr(mas, "__file__", None) is None:  # a plain folder named "mas" in the working directory
    sys.exit(f"a folder named 'mas' in {list(mas.__path__)} shadows the installed mas package; run from another directory")

from omegaconf import DictConfig

from mas.checkpointing import latest_checkpoint
from mas.config import ConfigError, parse
from mas.data import DataError
from mas.devices import resolve_device
from mas.training.finetune import FINETUNE_KEYS, LoRAFinetuneRecipe
from mas.training.parallel import SingleDevice

KEYS = FINETUNE_KEYS


class MASLoRAFinetuneRecipe(LoRAFinetuneRecipe):
    """The fine-tuning recipe on the single device named by ``cfg.device``."""

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg, SingleDevice(resolve_device(cfg.get("device", "auto"))), name=KEYS.recipe)


@parse(KEYS)
def recipe_main(cfg: DictConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        recipe = MASLoRAFinetuneRecipe(cfg)
        recipe.setup()
    except (ConfigError, DataError) as e:
        raise SystemExit(f"{KEYS.recipe}: {type(e).__name__}: {e}") from None
    recipe.train()
    recipe.cleanup()
    print(f"adapter written to {latest_checkpoint(recipe.output_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(recipe_main())
