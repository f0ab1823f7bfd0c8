"""The fine-tuning recipes' keys: each with its type, default and reason, declared once.

Defaults are the paper's settings (Katz et al., arXiv 2412.18487, Tables 6 and 7) where the paper
sets one; a bundled experiment (``configs/``) only writes what differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Literal, Optional

from mas.attention import AttentionBackend
from mas.config import ConfigError, component, option
from mas.masks import AttentionMode
from mas.model_weights import check_lora_values

__all__ = ["DistributedFinetuneOptions", "FinetuneOptions"]


@dataclass(kw_only=True)
class FinetuneOptions:
    """Keys of ``mas_lora_finetune`` (``tune run mas_lora_finetune --help`` prints them)."""

    output_dir: str = option(help="where checkpoints, metrics and logs go")
    attention: AttentionMode = option(help="mas: prompt segments bidirectional; causal: the baseline on the same path (required: the experiment's variable)")
    attention_backend: AttentionBackend = option("auto", "auto: FlexAttention on CUDA, SDPA with the dense mask otherwise")
    model: Any = component("a LoRA model builder")
    tokenizer: Any = component("a tokenizer builder; max_seq_len is the training cutoff")
    checkpointer: Any = component("the base weights (a torchtune FullModelHFCheckpointer)")
    dataset: Any = component("a mas.data dataset builder")
    optimizer: Any = component("an optimizer; gets the trainable parameters")
    lr_scheduler: Any = component("a schedule; gets num_training_steps")
    loss: Any = component("a loss over (logits, targets)")
    metric_logger: Any = component("a torchtune metric logger", required=False)
    val_dataset: Any = component("held-out data, scored at val_every_n_steps and epoch ends", required=False)
    seed: int = option(42, "random seed (LoRA init, shuffling, dropout)", min=0)
    shuffle: bool = option(True, "shuffle the training rows every epoch")
    batch_size: int = option(8, "examples per micro-batch (per rank when distributed); paper: 8", min=1)
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step", min=1)
    epochs: int = option(3, "passes over the data; paper: 3", min=1)
    max_steps_per_epoch: Optional[int] = option(None, "cap optimizer steps per epoch (null: all)", min=1)
    pad_to_multiple_of: Optional[int] = option(128, "round padded lengths up: FlexAttention tiles are 128 tokens, fewer shapes", min=1)
    num_workers: int = option(0, "DataLoader worker processes (they also check, shift and count each batch on the CPU)", min=0)
    lm_head_on_targets_only: bool = option(
        True, "LM head and loss only at positions whose target counts (same loss; skips prompts and padding)"
    )
    clip_grad_norm: Optional[float] = option(1.0, "max gradient norm (null: no clipping)", min=0.0)
    compile: bool = option(False, "torch.compile the model and loss: faster steps after a slow first one")
    enable_activation_checkpointing: bool = option(False, "recompute activations in backward: less memory, one more forward")
    device: str = option("auto", "cpu | cuda | cuda:N | auto (cuda when present)")
    dtype: Literal["bf16", "fp32"] = option("bf16", "weights and LoRA dtype (fp16 is refused: use bf16)")
    log_every_n_steps: int = option(10, "metrics cadence in optimizer steps", min=1)
    log_peak_memory_stats: bool = option(True, "log peak accelerator memory with the metrics")
    progress_bar: bool = option(True, "show progress: a bar on a terminal, a plain line every 10 s in a log or pipe")
    val_every_n_steps: Optional[int] = option(None, "validation cadence (null: epoch ends only)", min=1)
    max_val_batches: Optional[int] = option(None, "cap validation batches (null: all)", min=1)
    save_every_n_steps: Optional[int] = option(5000, "checkpoint cadence (null: epoch ends only)", min=1)
    save_merged_weights: bool = option(False, "also write merged HF weights at epoch ends (a full model copy each)")
    keep_last_n_checkpoints: Optional[int] = option(None, "delete older step checkpoints (null: keep all)", min=1)
    save_at_steps: Optional[List[int]] = option(
        None, "also checkpoint at these optimizer steps, never deleted by keep_last_n_checkpoints (mas_eval checkpoints=[...])"
    )
    resume_from_checkpoint: bool = option(False, "continue the run in output_dir from its latest checkpoint")
    overwrite_output_dir: bool = option(False, "a fresh run may replace another run's checkpoints in output_dir")
    on_nonfinite: Literal["stop", "skip"] = option(
        "stop", "a NaN/inf loss or gradient: stop (no adapter written after it) | skip the step (counted; one sync per step)"
    )

    def check(self) -> None:
        """Rules across keys."""
        check_lora_values(self.model)
        if self.resume_from_checkpoint and self.overwrite_output_dir:
            raise ConfigError("resume_from_checkpoint=True and overwrite_output_dir=True contradict each other; set one")
        if self.save_at_steps is not None and (not self.save_at_steps or min(self.save_at_steps) < 1):
            raise ConfigError(f"save_at_steps: a list of steps >= 1 (or null), got {self.save_at_steps}")
        if self.val_dataset is None and self.val_every_n_steps is not None:
            raise ConfigError("val_every_n_steps is set but there is no val_dataset; set val_dataset or val_every_n_steps=null")


@dataclass(kw_only=True)
class DistributedFinetuneOptions(FinetuneOptions):
    """Keys of ``mas_lora_finetune_distributed``: the single-device keys plus FSDP2 settings."""

    batch_size: int = option(1, "examples per micro-batch per rank (derived from global_batch_size when set)", min=1)
    global_batch_size: Optional[int] = option(None, "examples per optimizer step over all ranks (null: batch_size x ranks x accumulation)", min=1)
    distributed_backend: Literal["auto", "nccl", "gloo"] = option("auto", "auto: nccl on CUDA, gloo on CPU")
    fsdp_cpu_offload: bool = option(False, "keep sharded parameters on the CPU (slower, less GPU memory)")
    fsdp_reshard_after_forward: bool = option(True, "free gathered parameters after forward (less memory, one more all-gather)")
