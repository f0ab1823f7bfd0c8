"""The MAS LoRA fine-tuning recipe, shared by ``mas_lora_finetune`` and its distributed twin.

``setup`` builds, in torchtune's order: output and loggers, base weights, tokenizer, model,
optimizer, loss, data, schedule, then restores a checkpoint when resuming. ``train`` is a loop
of named steps (``_optimizer_step``, ``validate``, ``save_checkpoint``). Where it runs (one
device or FSDP2 ranks) is a :class:`~mas.training.parallel.Parallelism` object.
"""

from __future__ import annotations

import functools
import logging
import math
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, TypeVar

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm import tqdm

from mas.attention import use_mas_attention, uses_flex
from mas.block_mask import round_up_to_tile
from mas.checkpointing import CheckpointWriter, hf_info_from_checkpointer, latest_checkpoint
from mas.config import EXIT_INTERRUPTED, ConfigError, instantiate, resolved_yaml
from mas.errors import UserError
from mas.data import collate_segmented, pad_token_id
from mas.model_weights import check_vocab, read_base_state
from mas.progress import Progress
from mas.training.options import FinetuneOptions
from mas.training.metrics import MetricsFile, StepTimer, peak_memory_gib
from mas.training.model_setup import check_attention_backend, lora_settings
from mas.training.parallel import Parallelism, initial_adapter_state
from mas.training.run_identity import check_fresh_output_dir, check_resume_matches, run_fingerprint, write_run_file
from mas.training.run_state import DataPosition, load_run_checkpoint, mas_settings, restore_rng, save_run_checkpoint
from mas.training.sampler import ResumableSampler
from mas.training.loss import check_target_rows_loss
from mas.training.steps import HostBatch, prepare_batch, prepare_host_batch, summed_token_loss

__all__ = ["EXIT_INTERRUPTED", "LoRAFinetuneRecipe", "TrainingDivergedError", "TrainingInterrupted", "train_to_end"]

R = TypeVar("R", bound="LoRAFinetuneRecipe")

log = logging.getLogger("mas.finetune")

class TrainingDivergedError(UserError):
    """The loss or a gradient became NaN or infinite; the run stopped before saving it."""


class TrainingInterrupted(Exception):
    """Ctrl-C during a run: the message says at which step and how to resume (no traceback)."""

    def __init__(self, recipe: Optional["LoRAFinetuneRecipe"]) -> None:
        position = getattr(recipe, "position", None)
        output_dir = getattr(recipe, "output_dir", None)
        checkpoint = latest_checkpoint(output_dir) if output_dir is not None and Path(output_dir).is_dir() else None
        where = f"interrupted at step {position.global_step}" if position is not None else "interrupted before training started"
        if checkpoint is not None:
            how = f"resume with the same command and resume_from_checkpoint=True (continues from {checkpoint})"
        elif output_dir is not None and (Path(output_dir) / "run.json").exists():
            how = "no checkpoint was written yet: rerun the same command with overwrite_output_dir=True to start over"
        else:
            how = "nothing was written: rerun the same command"
        super().__init__(f"{where}; {how}")


def train_to_end(make: Callable[[], "R"]) -> "R":
    """Make a recipe, set it up, train and clean up: the run of both fine-tuning recipes.

    Raises:
        TrainingInterrupted: on Ctrl-C, after cleaning up, saying at which step and how to resume.
    """
    recipe = None
    try:
        recipe = make()
        recipe.setup()
        recipe.train()
    except KeyboardInterrupt:
        if recipe is not None:
            recipe.cleanup()
        raise TrainingInterrupted(recipe) from None
    recipe.cleanup()
    return recipe


def _collate_host_batch(items: Any, *, pad_id: int, pad_to_multiple_of: Optional[int], plan_windows: bool) -> HostBatch:
    """The loader's collate: pad the items, then check, shift, count and plan on the CPU."""
    batch = collate_segmented(items, pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of)
    return prepare_host_batch(batch, plan_windows=plan_windows)


class LoRAFinetuneRecipe:
    """LoRA fine-tuning with a MAS (or causal) attention mask built once per batch.

    Args:
        options (FinetuneOptions): the typed, checked keys of the recipe.
        config (DictConfig): the config they came from (saved, resolved, with the run).
        parallel (Parallelism): where it runs.
        name (str): recipe name for the progress bar and messages.
    """

    def __init__(
        self, options: FinetuneOptions, parallel: Parallelism, config: DictConfig, name: str = "mas_lora_finetune"
    ) -> None:
        from torchtune import training

        self.opts = options
        self.config = config
        self.parallel = parallel
        self.name = name
        self.device = parallel.device
        self.dtype = training.get_dtype(options.dtype, device=self.device)
        self.attention = options.attention
        self.backend = options.attention_backend
        check_attention_backend(self.backend, self.device)
        self.grad_accum = options.gradient_accumulation_steps
        self.output_dir = Path(options.output_dir)
        self.position = DataPosition()
        self.seed = options.seed
        # Same seed on every rank: LoRA dropout differs by rank only through the data it sees.
        training.set_seed(self.seed + parallel.rank)
        # First optimizer step with a non-finite loss or gradient (-1: none), kept on the device
        # so the check costs no sync; read at logging steps and before every checkpoint.
        self._first_nonfinite_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self.skipped_steps = 0
        self.last_saved_step = 0

    # ----------------------------------------------------------------------------- setup
    def setup(self) -> None:
        self._setup_output()
        self._setup_base_weights()
        self._claim_output_dir()
        self._setup_tokenizer()
        self._setup_model()
        self._setup_optimizer()
        self._setup_loss()
        self._setup_data()
        self._setup_lr_scheduler()
        self._setup_resume()
        self._setup_metrics()

    def _setup_output(self) -> None:
        """The output folder exists and is writable before anything expensive runs."""
        self.resuming = self.opts.resume_from_checkpoint
        self.metric_logger = self.metrics_file = None
        if self.parallel.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            # A fresh name: a probe must never replace a file of the user's.
            tempfile.TemporaryFile(dir=self.output_dir).close()
        self.writer = CheckpointWriter(self.output_dir, self.opts.keep_last_n_checkpoints, keep_steps=self.opts.save_at_steps or ())

    def _claim_output_dir(self) -> None:
        """Check that output_dir holds no other run (fresh) or this very run (resume); record it."""
        fingerprint = run_fingerprint(
            self.opts, recipe=self.name, base_checkpoint_dir=self.base_checkpoint_dir, world_size=self.parallel.world_size
        )
        if self.resuming:
            warning = check_resume_matches(self.output_dir, fingerprint)
            if warning and self.parallel.is_main:
                log.warning(warning)
        elif not self.opts.overwrite_output_dir:
            check_fresh_output_dir(self.output_dir, overwrite=False)
        self.parallel.barrier()  # every rank checked before the main rank writes
        if self.parallel.is_main:
            if not self.resuming:
                check_fresh_output_dir(self.output_dir, overwrite=True)
            write_run_file(self.output_dir, fingerprint)
            (self.output_dir / "config.yaml").write_text(resolved_yaml(self.config, type(self.opts)))

    def _setup_metrics(self) -> None:
        if not self.parallel.is_main:
            return
        resume_step = self.position.global_step if self.resuming else None
        self.metrics_file = MetricsFile(self.output_dir / "metrics.jsonl", resume_step=resume_step)
        self.metric_logger = instantiate(self.opts.metric_logger)
        if self.metric_logger is not None:
            # Resolved, as config.yaml: torchtune writes it as given (with ${...} and resolvers left).
            self.metric_logger.log_config(OmegaConf.create(OmegaConf.to_container(self.config, resolve=True)))

    def _setup_base_weights(self) -> None:
        checkpointer = instantiate(self.opts.checkpointer)
        self.hf_info = hf_info_from_checkpointer(checkpointer)
        self.base_checkpoint_dir = str(checkpointer._checkpoint_dir)
        self.base_state = read_base_state(checkpointer)

    def _setup_tokenizer(self) -> None:
        self.tokenizer = instantiate(self.opts.tokenizer)

    def _setup_model(self) -> None:
        from torchtune import training
        from torchtune.modules import TransformerSelfAttentionLayer
        from torchtune.modules.peft import get_adapter_params, set_trainable_params

        self.lora = lora_settings(self.opts.model)
        build_device = torch.device("meta") if self.parallel.builds_on_meta else self.device
        with training.set_default_dtype(self.dtype), build_device:
            model = instantiate(self.opts.model)
        set_trainable_params(model, get_adapter_params(model))
        if self.opts.enable_activation_checkpointing:
            training.set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})
        # A resumed run starts from the checkpoint's adapter, a fresh one from the seeded init.
        # Loading it here, before the optimizer exists, keeps the optimizer's parameters the
        # model's (FSDP2 loads full state dicts by assigning new parameters).
        self.resume_from = self._resume_checkpoint()
        start = self.resume_from[0] if self.resume_from else initial_adapter_state(model, self.seed)
        adapter = {k: v.to(self.dtype) for k, v in start.items()}
        self.model = self.parallel.prepare_model(model, self.base_state, adapter)
        del self.base_state
        use_mas_attention(self.model, self.backend)
        check_vocab(self.tokenizer, self.model)
        if self.opts.compile:
            training.compile_model(self.model)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        if self.parallel.is_main:
            n_train = sum(p.numel() for p in self.trainable)  # DTensor.numel() is the global size
            log.info("LoRA: %.3fM trainable parameters", n_train / 1e6)

    def _setup_optimizer(self) -> None:
        self.optimizer = instantiate(self.opts.optimizer, self.trainable)

    def _setup_loss(self) -> None:
        self.loss_fn = instantiate(self.opts.loss)
        if self.opts.lm_head_on_targets_only:
            check_target_rows_loss(self.model, self.loss_fn)
        chunks = getattr(self.loss_fn, "num_output_chunks", 0)
        if chunks:
            self.model.set_num_output_chunks(chunks)
        if self.opts.compile:
            from torchtune import training

            self.loss_fn = training.compile_loss(self.loss_fn)

    def _dataloader(self, dataset: Any, *, shuffle: bool) -> tuple[DataLoader, ResumableSampler]:
        sampler = ResumableSampler(
            len(dataset), shuffle=shuffle, seed=self.seed, rank=self.parallel.rank, world_size=self.parallel.world_size
        )
        pad_id = pad_token_id(self.tokenizer)
        multiple = self.opts.pad_to_multiple_of
        loader = DataLoader(
            dataset,
            batch_size=self.opts.batch_size,
            sampler=sampler,
            drop_last=True,  # a constant batch shape: no recompiles, equal-weight steps
            num_workers=self.opts.num_workers,
            # Checks, shift and token counts happen here, on the CPU (in the workers when there
            # are any), so the step never reads a device tensor to count.
            # A partial of a module function, not a lambda: spawn and forkserver workers (macOS;
            # Linux from Python 3.14) receive it pickled.
            collate_fn=functools.partial(
                _collate_host_batch,
                pad_id=pad_id,
                pad_to_multiple_of=multiple,
                plan_windows=not uses_flex(self.backend, self.device),  # flex has its own tiles
            ),
            # Page-locked batches: the step's non_blocking copies overlap the previous step's work.
            pin_memory=self.device.type == "cuda",
            # Its own generator: creating an iterator must not draw from the global RNG, or a
            # resumed run's dropout masks would differ from an uninterrupted run's.
            generator=torch.Generator().manual_seed(self.seed),
        )
        return loader, sampler

    def _check_fits_model(self, dataset: Any, key: str) -> None:
        """A batch longer than the model's positions would fail inside torchtune's forward."""
        model_len = getattr(self.model, "max_seq_len", None)
        if model_len is None:
            return
        multiple = self.opts.pad_to_multiple_of or 1
        longest = round_up_to_tile(dataset.longest_item, tile=multiple)
        if longest > model_len:
            what = f"{key}.pack_length={dataset.stats.pack_length}" if dataset.stats.packs else "its longest example"
            if longest != dataset.longest_item:
                what += f" padded to a multiple of pad_to_multiple_of={multiple} ({longest} tokens)"
            raise ConfigError(
                f"{key}: {what} is longer than the model's max_seq_len={model_len}; "
                f"lower {key}.pack_length / tokenizer.max_seq_len or pad_to_multiple_of, or raise model.max_seq_len"
            )

    def _setup_data(self) -> None:
        self.dataset = instantiate(self.opts.dataset, self.tokenizer)
        if self.parallel.is_main:
            log.info("train data: %s", self.dataset.stats.summary())
        self._check_fits_model(self.dataset, "dataset")
        per_step = self.opts.batch_size * self.parallel.world_size
        if len(self.dataset) < per_step:
            raise ConfigError(
                f"batch_size={self.opts.batch_size} x {self.parallel.world_size} rank(s) exceeds the "
                f"{len(self.dataset)} training examples"
            )
        self.loader, self.sampler = self._dataloader(self.dataset, shuffle=self.opts.shuffle)
        self.val_loader = None
        if self.opts.val_dataset is not None:
            val_dataset = instantiate(self.opts.val_dataset, self.tokenizer)
            if self.parallel.is_main:
                log.info("validation data: %s", val_dataset.stats.summary())
            self._check_fits_model(val_dataset, "val_dataset")
            self.val_loader, _ = self._dataloader(val_dataset, shuffle=False)
        batches = len(self.loader)
        self.steps_per_epoch = batches // self.grad_accum
        cap = self.opts.max_steps_per_epoch
        if cap is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, int(cap))
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"{batches} batches per epoch < gradient_accumulation_steps={self.grad_accum}: no optimizer step possible"
            )
        self.total_steps = self.steps_per_epoch * self.opts.epochs
        past = [s for s in self.opts.save_at_steps or () if s > self.total_steps]
        if past:
            raise ConfigError(
                f"save_at_steps: step {past[0]} is past the run's last step {self.total_steps} "
                f"({self.steps_per_epoch} steps per epoch x epochs={self.opts.epochs})"
            )

    def _setup_lr_scheduler(self) -> None:
        self.lr_scheduler = instantiate(self.opts.lr_scheduler, self.optimizer, num_training_steps=self.total_steps)

    def _resume_checkpoint(self) -> Optional[tuple]:
        """(adapter, adapter config, recipe state) of the checkpoint to resume from, or None."""
        if not self.resuming:
            return None
        folder = latest_checkpoint(self.output_dir)
        if folder is None:
            raise ConfigError(f"resume_from_checkpoint=True but {self.output_dir}/checkpoints has no complete checkpoint")
        adapter, adapter_config, state = load_run_checkpoint(folder, self.hf_info)
        trained = adapter_config.get("mas", {}).get("attention")
        if trained != self.attention:
            raise ConfigError(f"{folder} was trained with attention={trained}, this run asks for attention={self.attention}")
        if state.get("world_size", 1) != self.parallel.world_size:
            raise ConfigError(
                f"{folder} was written by {state.get('world_size', 1)} rank(s); resume with the same number "
                f"(the data order per rank depends on it), not {self.parallel.world_size}"
            )
        if self.parallel.is_main:
            log.info("resuming from %s", folder)
        return adapter, adapter_config, state

    def _setup_resume(self) -> None:
        """Restore optimizer, schedule, RNG and data position (the adapter is already loaded)."""
        if self.resume_from is None:
            return
        _, _, state = self.resume_from
        self.parallel.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        restore_rng(state["rng"][self.parallel.rank] if "rng_per_rank" in state else state["rng"])
        self.position = DataPosition(state["global_step"], state["epoch"], state["steps_in_epoch"])
        if state["epoch_end"]:
            self.position.epoch += 1
            self.position.steps_in_epoch = 0
        self.resume_from = None
        if self.parallel.is_main:
            log.info("resumed at step %d", self.position.global_step)

    # ----------------------------------------------------------------------------- training
    def _micro_batches(self, epoch: int, start_step: int) -> Iterator[Dict[str, torch.Tensor]]:
        self.sampler.set_epoch(epoch, start=start_step * self.grad_accum * self.opts.batch_size)
        return iter(self.loader)

    def _optimizer_step(self, batches: Iterator[Any]) -> Dict[str, Any]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches (per rank).

        No host read of a device tensor (on CUDA each one waits for the GPU to finish): token
        counts come from the CPU batches, the gradients get one fused scale, and the loss and
        gradient norm are returned as device tensors that ``train`` reads on logging steps only.
        The exception is ``on_nonfinite=skip``, which must know before stepping (one sync).
        """
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        local_targets = local_tokens = 0
        for _ in range(self.grad_accum):
            prepared = prepare_batch(next(batches), attention=self.attention, device=self.device, backend=self.backend)
            loss = summed_token_loss(
                self.model, self.loss_fn, prepared, lm_head_on_targets_only=self.opts.lm_head_on_targets_only
            )
            loss.backward()
            loss_sum += loss.detach().float()
            local_targets += prepared.num_targets
            local_tokens += prepared.num_tokens
        if self.parallel.world_size == 1:
            if local_targets == 0:
                raise RuntimeError("a whole optimizer step had no target token; check the data")
            num_targets: Any = local_targets
            num_tokens: Any = local_tokens
        else:
            # All ranks' counts need a collective: keep them on the device (queued, no wait).
            # A step without any target on any rank scales zero gradients by 1 (a no-op step).
            loss_sum = self.parallel.sum(loss_sum)
            counts = self.parallel.sum(_to_device_async([local_targets, local_tokens], self.device))
            num_targets, num_tokens = counts[0].clamp(min=1), counts[1]
        # Gradients of summed losses scaled to the gradient of the mean over all targets.
        _scale_grads_(self.trainable, self.parallel.gradient_scale(num_targets))
        max_norm = self.opts.clip_grad_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm=float(max_norm) if max_norm else math.inf)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        finite = torch.isfinite(loss_sum) & torch.isfinite(grad_norm)
        stats = {"num_tokens": num_tokens, "local_tokens": local_tokens, "skipped": False}
        if self.opts.on_nonfinite == "skip" and not bool(finite):  # one sync per step: the price of skipping
            self.optimizer.zero_grad(set_to_none=True)
            self.lr_scheduler.step()
            self.skipped_steps += 1
            return {**stats, "skipped": True}
        step = self.position.global_step + 1
        unseen = self._first_nonfinite_step < 0
        self._first_nonfinite_step = torch.where(~finite & unseen, step, self._first_nonfinite_step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        return {**stats, "loss": loss_sum / num_targets, "grad_norm": grad_norm}

    def _check_finite(self) -> None:
        """Stop (before any adapter is written) once a step had a non-finite loss or gradient.

        Raises:
            TrainingDivergedError: naming the first such step.
        """
        first = int(self._first_nonfinite_step)
        if first >= 0:
            raise TrainingDivergedError(
                f"training diverged: non-finite loss or gradient at step {first} (output_dir={self.output_dir}); "
                f"no checkpoint was written after step {self.last_saved_step}. Lower optimizer.lr, "
                "use dtype=bf16 or fp32, check the data, or set on_nonfinite=skip to skip such steps"
            )

    @torch.no_grad()
    def validate(self) -> Optional[float]:
        if self.val_loader is None:
            return None
        self.model.eval()
        totals = torch.zeros(2, device=self.device, dtype=torch.float64)  # [loss sum, targets]
        limit = self.opts.max_val_batches
        for i, batch in enumerate(self.val_loader):
            if limit is not None and i >= int(limit):
                break
            prepared = prepare_batch(batch, attention=self.attention, device=self.device, backend=self.backend)
            loss = summed_token_loss(
                self.model, self.loss_fn, prepared, lm_head_on_targets_only=self.opts.lm_head_on_targets_only
            )
            totals[0] += loss.double()
            totals[1] += prepared.num_targets
        self.model.train()
        totals = self.parallel.sum(totals)
        return float(totals[0] / totals[1].clamp(min=1))

    def _log(self, record: Dict[str, Any]) -> None:
        if not self.parallel.is_main:
            return
        self.metrics_file.write(record)
        if self.metric_logger is not None:
            payload = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            self.metric_logger.log_dict(payload, step=record["step"])

    def train(self) -> None:
        opts = self.opts
        log_every = opts.log_every_n_steps
        save_every = opts.save_every_n_steps
        save_at = frozenset(opts.save_at_steps or ())
        val_every = opts.val_every_n_steps
        # A bar on a terminal; in a log or a pipe, a plain line every few seconds.
        progress = Progress(
            self.total_steps,
            f"{self.name} [{self.attention}]",
            initial=self.position.global_step,
            enabled=opts.progress_bar and self.parallel.is_main,
        )
        # Timed over the steps between two logs: the timer's lap (a CUDA sync) runs only where
        # the loop syncs anyway (logging, validation, saving), never inside a run of steps.
        timer = StepTimer(self.device)
        window = _StepWindow()
        for epoch in range(self.position.epoch, opts.epochs):
            self.position.epoch = epoch
            batches = self._micro_batches(epoch, self.position.steps_in_epoch)
            while self.position.steps_in_epoch < self.steps_per_epoch:
                stats = self._optimizer_step(batches)
                self.position.global_step += 1
                self.position.steps_in_epoch += 1
                step = self.position.global_step
                window.add(stats)
                lr = self.optimizer.param_groups[0]["lr"]
                progress.update(1)
                if (step % log_every == 0 or step == self.total_steps) and not stats["skipped"]:
                    window.seconds += timer.lap()
                    self._check_finite()
                    loss = float(stats["loss"])
                    tokens_per_second = float(window.tokens) / window.seconds
                    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_second:.0f}")
                    record = {
                        "kind": "train",
                        "step": step,
                        "epoch": epoch,
                        "loss": loss,
                        "lr": lr,
                        "grad_norm": float(stats["grad_norm"]),
                        "skipped_steps": self.skipped_steps,
                        # Means over the steps since the previous log.
                        "tokens_per_second": tokens_per_second,
                        "tokens_per_second_per_rank": window.local_tokens / window.seconds,
                        "step_seconds": window.seconds / window.steps,
                        "world_size": self.parallel.world_size,
                    }
                    if opts.log_peak_memory_stats:
                        record.update(peak_memory_gib(self.device))
                    self._log(record)
                    window = _StepWindow()
                    timer.lap()
                validating = bool(val_every) and step % int(val_every) == 0
                epoch_end = self.position.steps_in_epoch == self.steps_per_epoch
                saving = ((bool(save_every) and step % int(save_every) == 0) or step in save_at) and not epoch_end
                if validating or saving:
                    window.seconds += timer.lap()
                    if validating:
                        self._log_validation(step, epoch)
                    if saving:
                        self.save_checkpoint(epoch_end=False)
                    timer.lap()  # validation and saving do not count as step time
            window.seconds += timer.lap()
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
            if self.parallel.is_main:
                tqdm.write(f"step {step}: val_loss {val_loss:.4f}")

    def save_checkpoint(self, *, epoch_end: bool) -> Optional[Path]:
        """Gather full states (every rank takes part); the main rank writes them atomically."""
        from mas.training.run_state import capture_rng

        self._check_finite()
        merged = epoch_end and self.opts.save_merged_weights
        model_state = self.parallel.full_state_dict(self.model, adapter_only=not merged)
        optimizer_state = self.parallel.full_optimizer_state(self.model, self.optimizer)
        rng = _gather_objects(capture_rng(), self.parallel)
        folder = None
        if self.parallel.is_main:
            from torchtune.modules.peft import get_adapter_state_dict

            folder = save_run_checkpoint(
                self.writer,
                position=self.position,
                adapter_state=get_adapter_state_dict(model_state),
                info=self.hf_info,
                lora=self.lora,
                mas=mas_settings(self.attention, self.dataset.segment_settings),
                optimizer_state=optimizer_state,
                scheduler_state=self.lr_scheduler.state_dict(),
                epoch_end=epoch_end,
                model_state=model_state if merged else None,
                base_checkpoint_dir=self.base_checkpoint_dir,
                extra={"world_size": self.parallel.world_size, **({"rng": rng, "rng_per_rank": True} if self.parallel.world_size > 1 else {})},
            )
            tqdm.write(f"saved checkpoint {folder}")
        self.last_saved_step = self.position.global_step
        self.parallel.barrier()
        return folder

    def cleanup(self) -> None:
        if getattr(self, "metrics_file", None) is not None:
            self.metrics_file.close()
        if getattr(self, "metric_logger", None) is not None:
            self.metric_logger.close()


class _StepWindow:
    """Optimizer steps since the last log: their count, tokens (host ints, or device tensors when
    distributed) and training seconds."""

    def __init__(self) -> None:
        self.steps = 0
        self.tokens: Any = 0
        self.local_tokens = 0
        self.seconds = 0.0

    def add(self, stats: Dict[str, Any]) -> None:
        self.steps += 1
        self.tokens = self.tokens + stats["num_tokens"]
        self.local_tokens += stats["local_tokens"]


def _to_device_async(values: list, device: torch.device) -> torch.Tensor:
    """A small host list on ``device`` without waiting: pinned then non-blocking on CUDA."""
    host = torch.tensor(values, dtype=torch.long)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


@torch.no_grad()
def _scale_grads_(params: list, scale: Any) -> None:
    """Multiply every gradient by ``scale`` (a float, or a device scalar) in one fused call.

    Sharded (DTensor) gradients are scaled through their local shards: a scalar factor commutes
    with sharding.
    """
    grads = [p.grad for p in params if p.grad is not None]
    local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    if local:
        torch._foreach_mul_(local, scale)


def _gather_objects(obj: Any, parallel: Parallelism) -> list:
    """Every rank's ``obj`` on every rank (a list, in rank order)."""
    if parallel.world_size == 1:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * parallel.world_size
    dist.all_gather_object(out, obj)
    return out
