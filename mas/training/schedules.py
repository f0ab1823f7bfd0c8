"""Learning-rate schedules missing from torchtune 0.6.1."""

from __future__ import annotations
from mas.errors import ConfigError

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["linear_schedule_with_warmup"]


def linear_schedule_with_warmup(
    optimizer: Optimizer, num_warmup_steps: int, num_training_steps: int, last_epoch: int = -1
) -> LambdaLR:
    """Linear warm-up from 0 to the base LR, then linear decay to 0 (the paper's schedule).

    Args:
        optimizer (Optimizer): the optimizer.
        num_warmup_steps (int): steps of linear warm-up.
        num_training_steps (int): total optimizer steps (the recipe passes this).
        last_epoch (int): the step to resume from (-1 for a fresh start).

    Returns:
        LambdaLR: the scheduler; call ``step()`` after every optimizer step.
    """
    if num_warmup_steps < 0 or num_training_steps <= 0:
        raise ConfigError(
            f"need num_warmup_steps >= 0 and num_training_steps > 0, got {num_warmup_steps}, {num_training_steps}"
        )

    def factor(step: int) -> float:
        if step < num_warmup_steps:
            return (step + 1) / (num_warmup_steps + 1)
        remaining = num_training_steps - step
        return max(0.0, remaining / max(1, num_training_steps - num_warmup_steps))

    return LambdaLR(optimizer, factor, last_epoch)
