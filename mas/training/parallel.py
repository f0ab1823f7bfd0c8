"""Where the fine-tuning loop runs: one device, or FSDP2 over ``torchrun`` ranks.

The recipe calls the same few operations either way; :class:`SingleDevice` does them locally
and :class:`FSDP2` shards the model with PyTorch's ``fully_shard`` (FSDP2), reduces metrics
across ranks, and gathers full state dicts to rank 0 for checkpoints in the same PEFT/HF
layouts. No parallelism is home-made: torchrun launches, ``torch.distributed`` communicates.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Dict

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mas.config import ConfigError
from mas.model_weights import load_adapter_state, load_base_state

__all__ = ["FSDP2", "Parallelism", "SingleDevice", "initial_adapter_state"]

log = logging.getLogger(__name__)


def initial_adapter_state(model: nn.Module, seed: int) -> Dict[str, Tensor]:
    """Fresh LoRA weights, the same for any world size: ``lora_a`` Kaiming-uniform, ``lora_b`` 0.

    Drawn on CPU from a generator seeded by ``seed``, parameter by parameter in name order, so a
    single-device run and an FSDP run start from identical adapters.
    """
    from torchtune.modules.peft import get_adapter_params

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, param in sorted(get_adapter_params(model).items()):
        shape = tuple(param.shape)
        if ".lora_a." in name:
            # kaiming_uniform_(a=sqrt(5)) on a [r, in] matrix: bound = 1 / sqrt(in).
            bound = 1.0 / math.sqrt(shape[1])
            state[name] = (torch.rand(shape, generator=generator) * 2 - 1) * bound
        elif ".lora_b." in name:
            state[name] = torch.zeros(shape)
        else:
            raise ConfigError(f"cannot initialise adapter parameter {name} (DoRA is not supported here)")
    return state


class Parallelism:
    """The operations the recipe needs; single-device semantics."""

    rank: int = 0
    world_size: int = 1

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare_model(self, model: nn.Module, base_state: Dict[str, Tensor], adapter_state: Dict[str, Tensor]) -> nn.Module:
        """Load base and adapter weights into a model built on ``self.device``."""
        load_base_state(model, base_state)
        load_adapter_state(model, adapter_state)
        return model

    @property
    def builds_on_meta(self) -> bool:
        return False

    def sum(self, value: Tensor) -> Tensor:
        return value

    def gradient_scale(self, num_targets: int) -> float:
        """Factor turning reduced gradients of summed losses into the gradient of the mean."""
        return 1.0 / num_targets

    def full_state_dict(self, model: nn.Module, adapter_only: bool = False) -> Dict[str, Tensor]:
        from torchtune.modules.peft import get_adapter_state_dict

        state = model.state_dict()
        return get_adapter_state_dict(state) if adapter_only else state

    def full_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
        return optimizer.state_dict()

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
        optimizer.load_state_dict(state)

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


class SingleDevice(Parallelism):
    """One process, one device."""


class FSDP2(Parallelism):
    """FSDP2 (``fully_shard``) over the ranks ``torchrun`` started.

    Args:
        device_type (str): ``cuda`` (one GPU per local rank) or ``cpu``.
        backend (str): ``auto`` (nccl on CUDA, gloo on CPU), ``nccl`` or ``gloo``.
        reshard_after_forward (bool): free gathered parameters after forward (saves memory).
        cpu_offload (bool): keep sharded parameters on CPU.
    """

    def __init__(self, device_type: str, backend: str = "auto", *, reshard_after_forward: bool = True, cpu_offload: bool = False) -> None:
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ConfigError(
                "the distributed recipe must be launched by torchrun: "
                "tune run --nproc_per_node N mas_lora_finetune_distributed --config ..."
            )
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        if device_type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError("device=cuda but CUDA is not available (use device=cpu with the gloo backend)")
            if local_world > torch.cuda.device_count():
                raise ConfigError(
                    f"{local_world} ranks on this node but only {torch.cuda.device_count()} CUDA device(s): "
                    "lower --nproc_per_node"
                )
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        elif device_type == "cpu":
            device = torch.device("cpu")
        else:
            raise ConfigError(f"device must be cuda or cpu for distributed training, got {device_type!r}")
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl" and device.type != "cuda":
            raise ConfigError("distributed_backend=nccl needs CUDA devices; use gloo on CPU")
        if backend not in ("nccl", "gloo"):
            raise ConfigError(f"distributed_backend must be auto, nccl or gloo, got {backend!r}")
        super().__init__(device)
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        self.backend = backend
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.reshard_after_forward = reshard_after_forward
        self.cpu_offload = cpu_offload

    @property
    def builds_on_meta(self) -> bool:
        return True

    def prepare_model(self, model: nn.Module, base_state: Dict[str, Tensor], adapter_state: Dict[str, Tensor]) -> nn.Module:
        """Shard a meta-device model, then materialize it from full state dicts."""
        from torchtune import training

        training.shard_model(
            model=model,
            shard_conditions=[lambda name, module: isinstance(module, _decoder_layer_type())],
            cpu_offload=self.cpu_offload,
            reshard_after_forward=self.reshard_after_forward,
        )
        with self.device:
            for module in model.modules():
                if hasattr(module, "rope_init"):
                    module.rope_init()
        _, unexpected = training.load_from_full_model_state_dict(model, base_state, self.device, strict=False, cpu_offload=self.cpu_offload)
        _, unexpected_adapter = training.load_from_full_model_state_dict(
            model, adapter_state, self.device, strict=False, cpu_offload=self.cpu_offload
        )
        if unexpected or unexpected_adapter:
            raise ConfigError(f"the checkpoint does not fit the model: unexpected {list(unexpected)[:4]} {list(unexpected_adapter)[:4]}")
        training.validate_no_params_on_meta_device(model)
        return model

    def sum(self, value: Tensor) -> Tensor:
        value = value.detach().clone().to(self.device)
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def gradient_scale(self, num_targets: int) -> float:
        # FSDP averages gradients over ranks; the loss is a sum over all ranks' targets.
        return self.world_size / num_targets

    def full_state_dict(self, model: nn.Module, adapter_only: bool = False) -> Dict[str, Tensor]:
        from torchtune import training

        return training.gather_cpu_state_dict(model, self.is_main, device=self.device, adapter_weights_only=adapter_only)

    def full_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
        """The full (unsharded) optimizer state on rank 0, keyed by parameter name; {} elsewhere."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(model, optimizer, options=options)
        return state if self.is_main else {}

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
        """Shard a full optimizer state (every rank read it from the checkpoint) into ``optimizer``.

        torchtune 0.6.1's ``load_from_full_optimizer_state_dict`` silently loads nothing into a
        fresh optimizer (its state is empty, so there is nothing to match); the state is
        materialized first here.
        """
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        _materialize_optimizer_state(optimizer)
        set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _materialize_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's per-parameter state with one no-op step (zero grads, lr 0)."""
    if optimizer.state:
        return
    saved_lrs = []
    for group in optimizer.param_groups:
        saved_lrs.append(group["lr"])
        group["lr"] = 0.0
        for param in group["params"]:
            param.grad = torch.zeros_like(param)
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, saved_lrs):
        group["lr"] = lr
        for param in group["params"]:
            param.grad = None


def _decoder_layer_type() -> type:
    from torchtune.modules import TransformerSelfAttentionLayer

    return TransformerSelfAttentionLayer
