"""Building blocks shared by the fine-tuning recipes (single device and distributed)."""

from mas.training.metrics import MetricsFile, StepTimer, peak_memory_gib, read_metrics
from mas.training.model_setup import check_attention_backend, lora_settings
from mas.training.run_state import (
    DataPosition,
    capture_rng,
    load_run_checkpoint,
    mas_settings,
    restore_rng,
    save_run_checkpoint,
)
from mas.training.sampler import ResumableSampler
from mas.training.schedules import linear_schedule_with_warmup
from mas.training.steps import PreparedBatch, prepare_batch, summed_token_loss

__all__ = [
    "DataPosition",
    "MetricsFile",
    "PreparedBatch",
    "ResumableSampler",
    "StepTimer",
    "capture_rng",
    "check_attention_backend",
    "linear_schedule_with_warmup",
    "load_run_checkpoint",
    "lora_settings",
    "mas_settings",
    "peak_memory_gib",
    "prepare_batch",
    "read_metrics",
    "restore_rng",
    "save_run_checkpoint",
    "summed_token_loss",
]
