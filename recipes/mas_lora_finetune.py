"""MAS LoRA fine-tuning on one device.

    tune run mas_lora_finetune --config llama3_2_1b_mas.yaml [key=value ...]

``attention: mas`` trains with Masked Attention by Segment; ``attention: causal`` is the baseline
on the same data and the same attention path. See ``configs/`` for every option.

This module is installed top-level (torchtune's ``tune run NAME`` runs an unregistered recipe
with ``runpy.run_module``); shared logic lives in ``mas``.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import mas

if getattr(mas, "__file__", None) is None:  # a plain folder named "mas" in the working directory
    sys.exit(f"a folder named 'mas' in {list(mas.__path__)} shadows the installed mas package; run from another directory")

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm import tqdm

from mas.checkpointing import CheckpointWriter, hf_info_from_checkpointer, latest_checkpoint
from mas.config import ConfigError, RecipeKeys, instantiate, parse
from mas.data import DataError, collate_segmented, pad_token_id
from mas.training import (
    DataPosition,
    MetricsFile,
    ResumableSampler,
    StepTimer,
    check_attention_backend,
    check_vocab,
    load_lora_model,
    load_run_checkpoint,
    lora_settings,
    mas_settings,
    peak_memory_gib,
    prepare_batch,
    resolve_device,
    restore_rng,
    save_run_checkpoint,
    summed_token_loss,
)

log = logging.getLogger("mas_lora_finetune")

KEYS = RecipeKeys(
    recipe="mas_lora_finetune",
    required={
        "output_dir": "where checkpoints and logs go",
        "model": "a LoRA model builder (_component_)",
        "tokenizer": "a tokenizer builder (_component_)",
        "checkpointer": "a torchtune FullModelHFCheckpointer for the base weights",
        "dataset": "a mas.data dataset builder (_component_)",
        "attention": "mas | causal",
        "optimizer": "an optimizer (_component_)",
        "lr_scheduler": "a schedule (_component_), gets num_training_steps",
        "loss": "a loss (_component_)",
        "batch_size": "examples per micro-batch",
        "epochs": "passes over the data",
    },
    optional={
        "seed": "random seed",
        "shuffle": "shuffle the training data",
        "device": "cpu | cuda | cuda:N | auto",
        "dtype": "bf16 | fp32",
        "attention_backend": "auto | flex | sdpa",
        "pad_to_multiple_of": "round padded lengths up (fewer compiled shapes)",
        "num_workers": "DataLoader workers",
        "max_steps_per_epoch": "cap optimizer steps per epoch",
        "gradient_accumulation_steps": "micro-batches per optimizer step",
        "clip_grad_norm": "max gradient norm (null: no clipping)",
        "compile": "torch.compile the model and loss",
        "enable_activation_checkpointing": "recompute activations in backward",
        "metric_logger": "a torchtune metric logger (_component_)",
        "log_every_n_steps": "metrics cadence",
        "log_peak_memory_stats": "log peak memory",
        "val_dataset": "held-out data (_component_), optional",
        "val_every_n_steps": "validation cadence (null: epoch ends only)",
        "max_val_batches": "cap validation batches",
        "save_every_n_steps": "checkpoint cadence (null: epoch ends only)",
        "save_merged_weights": "also write merged HF weights at epoch ends",
        "keep_last_n_checkpoints": "delete older checkpoints (null: keep all)",
        "resume_from_checkpoint": "continue from output_dir/checkpoints/latest",
        "progress_bar": "show a tqdm progress bar",
    },
)


class MASLoRAFinetuneRecipe:
    """LoRA fine-tuning with a MAS (or causal) attention mask built once per batch."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.get("device", "auto"))
        from torchtune import training

        self.dtype = training.get_dtype(cfg.get("dtype", "fp32"), device=self.device)
        if cfg.attention not in ("mas", "causal"):
            raise ConfigError(f"attention must be 'mas' or 'causal', got {cfg.attention!r}")
        self.attention = cfg.attention
        self.backend = cfg.get("attention_backend", "auto")
        check_attention_backend(self.backend, self.device)
        self.grad_accum = int(cfg.get("gradient_accumulation_steps", 1))
        if self.grad_accum < 1 or int(cfg.batch_size) < 1:
            raise ConfigError("batch_size and gradient_accumulation_steps must be >= 1")
        self.output_dir = Path(cfg.output_dir)
        self.position = DataPosition()
        training.set_seed(cfg.get("seed", 0))

    # ----------------------------------------------------------------------------- setup
    def setup(self) -> None:
        self._setup_output()
        self._setup_base_weights()
        self._setup_tokenizer()
        self._setup_model()
        self._setup_optimizer()
        self._setup_loss()
        self._setup_data()
        self._setup_lr_scheduler()
        self._setup_resume()

    def _setup_output(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.cfg, self.output_dir / "config.yaml")
        self.resuming = bool(self.cfg.get("resume_from_checkpoint", False))
        self.metric_logger = instantiate(self.cfg.get("metric_logger"))
        if self.metric_logger is not None:
            self.metric_logger.log_config(self.cfg)
        self.metrics_file = MetricsFile(self.output_dir / "metrics.jsonl", resume=self.resuming)
        self.writer = CheckpointWriter(self.output_dir, self.cfg.get("keep_last_n_checkpoints"))

    def _setup_base_weights(self) -> None:
        checkpointer = instantiate(self.cfg.checkpointer)
        self.hf_info = hf_info_from_checkpointer(checkpointer)
        self.base_checkpoint_dir = str(checkpointer._checkpoint_dir)
        self.base_state = checkpointer.load_checkpoint()["model"]

    def _setup_tokenizer(self) -> None:
        self.tokenizer = instantiate(self.cfg.tokenizer)

    def _setup_model(self) -> None:
        self.lora = lora_settings(self.cfg.model)
        self.model = load_lora_model(
            self.cfg.model,
            self.base_state,
            device=self.device,
            dtype=self.dtype,
            attention_backend=self.backend,
            activation_checkpointing=self.cfg.get("enable_activation_checkpointing", False),
        )
        del self.base_state
        check_vocab(self.tokenizer, self.model)
        if self.cfg.get("compile", False):
            from torchtune import training

            training.compile_model(self.model)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        n_train = sum(p.numel() for p in self.trainable)
        n_total = sum(p.numel() for p in self.model.parameters())
        log.info("model: %.2fM parameters, %.3fM trainable (LoRA)", n_total / 1e6, n_train / 1e6)

    def _setup_optimizer(self) -> None:
        self.optimizer = instantiate(self.cfg.optimizer, self.trainable)

    def _setup_loss(self) -> None:
        self.loss_fn = instantiate(self.cfg.loss)
        chunks = getattr(self.loss_fn, "num_output_chunks", 0)
        if chunks:
            self.model.set_num_output_chunks(chunks)
        if self.cfg.get("compile", False):
            from torchtune import training

            self.loss_fn = training.compile_loss(self.loss_fn)

    def _dataloader(self, dataset: Any, *, shuffle: bool) -> tuple[DataLoader, ResumableSampler]:
        sampler = ResumableSampler(len(dataset), shuffle=shuffle, seed=self.cfg.get("seed", 0))
        pad_id = pad_token_id(self.tokenizer)
        multiple = self.cfg.get("pad_to_multiple_of")
        loader = DataLoader(
            dataset,
            batch_size=int(self.cfg.batch_size),
            sampler=sampler,
            drop_last=True,  # a constant batch shape: no recompiles, equal-weight steps
            num_workers=int(self.cfg.get("num_workers", 0)),
            collate_fn=lambda items: collate_segmented(items, pad_id=pad_id, pad_to_multiple_of=multiple),
            # Its own generator: creating an iterator must not draw from the global RNG, or a
            # resumed run's dropout masks would differ from an uninterrupted run's.
            generator=torch.Generator().manual_seed(int(self.cfg.get("seed", 0))),
        )
        return loader, sampler

    def _setup_data(self) -> None:
        self.dataset = instantiate(self.cfg.dataset, self.tokenizer)
        log.info("train data: %s", self.dataset.stats.summary())
        if len(self.dataset) < int(self.cfg.batch_size):
            raise ConfigError(f"batch_size={self.cfg.batch_size} exceeds the {len(self.dataset)} training examples")
        self.loader, self.sampler = self._dataloader(self.dataset, shuffle=self.cfg.get("shuffle", True))
        self.val_loader = None
        if self.cfg.get("val_dataset") is not None:
            val_dataset = instantiate(self.cfg.val_dataset, self.tokenizer)
            log.info("validation data: %s", val_dataset.stats.summary())
            self.val_loader, _ = self._dataloader(val_dataset, shuffle=False)
        batches = len(self.loader)
        self.steps_per_epoch = batches // self.grad_accum
        cap = self.cfg.get("max_steps_per_epoch")
        if cap is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, int(cap))
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"{batches} batches per epoch < gradient_accumulation_steps={self.grad_accum}: no optimizer step possible"
            )
        self.total_steps = self.steps_per_epoch * int(self.cfg.epochs)

    def _setup_lr_scheduler(self) -> None:
        self.lr_scheduler = instantiate(
            self.cfg.lr_scheduler, self.optimizer, num_training_steps=self.total_steps
        )

    def _setup_resume(self) -> None:
        if not self.resuming:
            return
        folder = latest_checkpoint(self.output_dir)
        if folder is None:
            raise ConfigError(f"resume_from_checkpoint=True but {self.output_dir}/checkpoints has no complete checkpoint")
        adapter, adapter_config, state = load_run_checkpoint(folder, self.hf_info)
        if adapter_config.get("mas", {}).get("attention") != self.attention:
            raise ConfigError(
                f"{folder} was trained with attention={adapter_config.get('mas', {}).get('attention')}, "
                f"this run asks for attention={self.attention}"
            )
        from mas.training.model_setup import load_adapter_state

        load_adapter_state(self.model, adapter)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        restore_rng(state["rng"])
        self.position = DataPosition(state["global_step"], state["epoch"], state["steps_in_epoch"])
        if state["epoch_end"]:
            self.position.epoch += 1
            self.position.steps_in_epoch = 0
        log.info("resumed from %s at step %d", folder, self.position.global_step)

    # ----------------------------------------------------------------------------- training
    def _micro_batches(self, epoch: int, start_step: int) -> Iterator[Dict[str, torch.Tensor]]:
        self.sampler.set_epoch(epoch, start=start_step * self.grad_accum * int(self.cfg.batch_size))
        return iter(self.loader)

    def _optimizer_step(self, batches: Iterator[Dict[str, torch.Tensor]]) -> Dict[str, float]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches."""
        from torchtune import training

        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        num_targets = num_tokens = 0
        for _ in range(self.grad_accum):
            prepared = prepare_batch(next(batches), attention=self.attention, device=self.device, backend=self.backend)
            loss = summed_token_loss(self.model, self.loss_fn, prepared)
            loss.backward()
            loss_sum += loss.detach()
            num_targets += prepared.num_targets
            num_tokens += prepared.num_tokens
        if num_targets == 0:
            raise RuntimeError("a whole optimizer step had no target token; check the data")
        # Gradients of summed losses / total targets = gradient of the mean over all targets.
        training.scale_grads(self.model, torch.tensor(1.0 / num_targets))
        max_norm = self.cfg.get("clip_grad_norm")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm=float(max_norm) if max_norm else math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        return {
            "loss": loss_sum.item() / num_targets,
            "grad_norm": grad_norm.item(),
            "num_tokens": num_tokens,
        }

    @torch.no_grad()
    def validate(self) -> Optional[float]:
        if self.val_loader is None:
            return None
        self.model.eval()
        loss_sum, count = 0.0, 0
        limit = self.cfg.get("max_val_batches")
        for i, batch in enumerate(self.val_loader):
            if limit is not None and i >= int(limit):
                break
            prepared = prepare_batch(batch, attention=self.attention, device=self.device, backend=self.backend)
            loss_sum += summed_token_loss(self.model, self.loss_fn, prepared).item()
            count += prepared.num_targets
        self.model.train()
        return loss_sum / max(count, 1)

    def _log(self, record: Dict[str, Any]) -> None:
        self.metrics_file.write(record)
        if self.metric_logger is not None:
            payload = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            self.metric_logger.log_dict(payload, step=record["step"])

    def train(self) -> None:
        cfg = self.cfg
        log_every = int(cfg.get("log_every_n_steps", 1))
        save_every = cfg.get("save_every_n_steps")
        val_every = cfg.get("val_every_n_steps")
        progress = tqdm(
            total=self.total_steps,
            initial=self.position.global_step,
            desc=f"{KEYS.recipe} [{self.attention}]",
            disable=not cfg.get("progress_bar", True),
            dynamic_ncols=True,
        )
        timer = StepTimer(self.device)
        for epoch in range(self.position.epoch, int(cfg.epochs)):
            self.position.epoch = epoch
            batches = self._micro_batches(epoch, self.position.steps_in_epoch)
            while self.position.steps_in_epoch < self.steps_per_epoch:
                stats = self._optimizer_step(batches)
                self.position.global_step += 1
                self.position.steps_in_epoch += 1
                step = self.position.global_step
                seconds = timer.lap()
                lr = self.optimizer.param_groups[0]["lr"]
                progress.update(1)
                progress.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{stats['num_tokens'] / seconds:.0f}")
                if step % log_every == 0 or step == self.total_steps:
                    record = {
                        "kind": "train",
                        "step": step,
                        "epoch": epoch,
                        "loss": stats["loss"],
                        "lr": lr,
                        "grad_norm": stats["grad_norm"],
                        "tokens_per_second": stats["num_tokens"] / seconds,
                        "step_seconds": seconds,
                    }
                    if cfg.get("log_peak_memory_stats", True):
                        record.update(peak_memory_gib(self.device))
                    self._log(record)
                if val_every and step % int(val_every) == 0:
                    self._log_validation(step, epoch)
                epoch_end = self.position.steps_in_epoch == self.steps_per_epoch
                if save_every and step % int(save_every) == 0 and not epoch_end:
                    self.save_checkpoint(epoch_end=False)
                timer.lap()  # exclude logging, validation and saving from the next step's time
            if not val_every or self.position.global_step % int(val_every):
                self._log_validation(self.position.global_step, epoch)
            self.save_checkpoint(epoch_end=True)
            self.position.steps_in_epoch = 0
            timer.lap()
        progress.close()

    def _log_validation(self, step: int, epoch: int) -> None:
        val_loss = self.validate()
        if val_loss is not None:
            self._log({"kind": "val", "step": step, "epoch": epoch, "val_loss": val_loss})
            tqdm.write(f"step {step}: val_loss {val_loss:.4f}")

    def save_checkpoint(self, *, epoch_end: bool) -> Path:
        from torchtune.modules.peft import get_adapter_state_dict

        model_state = self.model.state_dict()
        merged = epoch_end and self.cfg.get("save_merged_weights", False)
        folder = save_run_checkpoint(
            self.writer,
            position=self.position,
            adapter_state=get_adapter_state_dict(model_state),
            info=self.hf_info,
            lora=self.lora,
            mas=mas_settings(self.attention, self.cfg.dataset),
            optimizer_state=self.optimizer.state_dict(),
            scheduler_state=self.lr_scheduler.state_dict(),
            epoch_end=epoch_end,
            model_state=model_state if merged else None,
            base_checkpoint_dir=self.base_checkpoint_dir,
        )
        tqdm.write(f"saved checkpoint {folder}")
        return folder

    def cleanup(self) -> None:
        self.metrics_file.close()
        if self.metric_logger is not None:
            self.metric_logger.close()


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
    latest = latest_checkpoint(recipe.output_dir)
    print(f"adapter written to {latest}")
    return 0


if __name__ == "__main__":
    sys.exit(recipe_main())
