"""Checkpoints: PEFT adapters, merged HF weights and resumable recipe state, written atomically.

Layout of a run's ``output_dir``::

    run.json                        what produced the run: base weights, settings (run_identity.py)
    checkpoints/
      step_000100/                  one complete checkpoint (written as step_000100.tmp, renamed)
        adapter_model.safetensors   LoRA weights, PEFT key names (base_model.model.model.layers...)
        adapter_config.json         PEFT LoraConfig fields + "mas": attention mode, segment rules
        recipe_state.pt             optimizer, lr scheduler, RNG, data position, step
        merged/                     (save_merged_weights) full weights in the HF layout
      latest                        name of the newest complete checkpoint (replaced atomically)

A crash in the middle of a save leaves a ``*.tmp`` folder that is ignored (and removed by the
next save); ``latest`` still names the previous complete checkpoint.

Weight layouts: torchtune rotates q/k projections differently from Hugging Face's Llama and
Mistral checkpoints (a per-head row permutation), so LoRA ``B`` matrices of ``q_proj``/``k_proj``
are permuted on export and un-permuted on import. Qwen2 checkpoints use torchtune's layout
already and are never permuted (torchtune 0.6.1's own PEFT export permutes them anyway).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Dict, List, Optional

import torch
from torch import Tensor

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "CheckpointWriter",
    "HFModelInfo",
    "RECIPE_STATE_FILE",
    "RUN_FILE",
    "adapter_to_peft",
    "hf_info_from_checkpointer",
    "latest_checkpoint",
    "load_peft_adapter",
    "merged_hf_state",
    "peft_target_modules",
    "peft_to_adapter",
    "step_checkpoints",
]

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
RECIPE_STATE_FILE = "recipe_state.pt"
MERGED_DIR = "merged"
LATEST_FILE = "latest"
RUN_FILE = "run.json"

# torchtune module name -> Hugging Face module path inside a decoder layer.
_TUNE_TO_HF_MODULE = {
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.output_proj": "self_attn.o_proj",
    "mlp.w1": "mlp.gate_proj",
    "mlp.w2": "mlp.down_proj",
    "mlp.w3": "mlp.up_proj",
}
_TUNE_TO_PEFT_TARGET = {
    "q_proj": "q_proj",
    "k_proj": "k_proj",
    "v_proj": "v_proj",
    "output_proj": "o_proj",
    "w1": "gate_proj",
    "w2": "down_proj",
    "w3": "up_proj",
    "output": "lm_head",
}
_PERMUTED_FAMILIES = ("LLAMA2", "LLAMA3", "LLAMA3_2", "MISTRAL")


@dataclass(frozen=True)
class HFModelInfo:
    """What weight conversion needs to know about a Hugging Face checkpoint.

    Attributes:
        model_type (str): torchtune ``ModelType`` name (``LLAMA3_2``, ``QWEN2``, ``MISTRAL``...).
        num_heads (int), num_kv_heads (int), dim (int), head_dim (int): attention shapes.
        tie_word_embeddings (bool): whether the output projection is the embedding.
        hf_config (dict): the checkpoint's ``config.json``.
    """

    model_type: str
    num_heads: int
    num_kv_heads: int
    dim: int
    head_dim: int
    tie_word_embeddings: bool
    hf_config: Dict[str, Any]

    @classmethod
    def from_checkpoint_dir(cls, checkpoint_dir: str | os.PathLike, model_type: str) -> "HFModelInfo":
        config_path = Path(checkpoint_dir) / "config.json"
        if not config_path.exists():
            raise FileNotFoundError(f"no config.json in checkpoint folder {checkpoint_dir}")
        config = json.loads(config_path.read_text())
        num_heads = config["num_attention_heads"]
        return cls(
            model_type=model_type.upper(),
            num_heads=num_heads,
            num_kv_heads=config.get("num_key_value_heads", num_heads),
            dim=config["hidden_size"],
            head_dim=config.get("head_dim") or config["hidden_size"] // num_heads,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            hf_config=config,
        )

    @property
    def permutes_qk(self) -> bool:
        return self.model_type in _PERMUTED_FAMILIES


def _permute_rows(t: Tensor, n_heads: int, head_dim: int) -> Tensor:
    # torchtune -> HF rotary layout: within each head, interleaved pairs -> two halves.
    # [n_heads * head_dim, r] -> [n_heads, head_dim // 2, 2, r] -> [n_heads, 2, head_dim // 2, r]
    r = t.shape[-1]
    return t.view(n_heads, head_dim // 2, 2, r).transpose(1, 2).reshape(n_heads * head_dim, r)


def _unpermute_rows(t: Tensor, n_heads: int, head_dim: int) -> Tensor:
    # HF -> torchtune: the inverse of _permute_rows.
    r = t.shape[-1]
    return t.view(n_heads, 2, head_dim // 2, r).transpose(1, 2).reshape(n_heads * head_dim, r)


def _qk_heads(module: str, info: HFModelInfo) -> Optional[int]:
    if not info.permutes_qk:
        return None
    if module.endswith("q_proj"):
        return info.num_heads
    if module.endswith("k_proj"):
        return info.num_kv_heads
    return None


def _tune_module_to_peft(module: str) -> str:
    # "layers.3.attn.q_proj" -> "base_model.model.model.layers.3.self_attn.q_proj"; "output" -> lm_head
    if module == "output":
        return "base_model.model.lm_head"
    parts = module.split(".")
    if parts[0] != "layers" or ".".join(parts[2:]) not in _TUNE_TO_HF_MODULE:
        raise ValueError(f"cannot map LoRA module {module!r} to a PEFT name")
    return f"base_model.model.model.layers.{parts[1]}.{_TUNE_TO_HF_MODULE['.'.join(parts[2:])]}"


def adapter_to_peft(adapter_state: Dict[str, Tensor], info: HFModelInfo) -> Dict[str, Tensor]:
    """torchtune LoRA weights (``layers.0.attn.q_proj.lora_a.weight``) -> PEFT names and layout."""
    out: Dict[str, Tensor] = {}
    for key, value in adapter_state.items():
        module, _, leaf = key.rpartition(".lora_")
        if not module:
            raise ValueError(f"not a LoRA weight: {key!r}")
        which = leaf.split(".")[0]  # "a" or "b"
        heads = _qk_heads(module, info)
        if which == "b" and heads is not None:
            value = _permute_rows(value, heads, info.head_dim)
        out[f"{_tune_module_to_peft(module)}.lora_{which.upper()}.weight"] = value.contiguous()
    return out


def peft_to_adapter(peft_state: Dict[str, Tensor], info: HFModelInfo) -> Dict[str, Tensor]:
    """The inverse of :func:`adapter_to_peft`."""
    hf_to_tune = {v: k for k, v in _TUNE_TO_HF_MODULE.items()}
    out: Dict[str, Tensor] = {}
    for key, value in peft_state.items():
        module, _, leaf = key.rpartition(".lora_")
        which = leaf.split(".")[0].lower()
        if module == "base_model.model.lm_head":
            tune_module = "output"
        else:
            prefix = "base_model.model.model.layers."
            if not module.startswith(prefix):
                raise ValueError(f"unexpected PEFT adapter key {key!r}")
            layer, _, hf_module = module[len(prefix) :].partition(".")
            if hf_module not in hf_to_tune:
                raise ValueError(f"unexpected PEFT adapter module {hf_module!r} in {key!r}")
            tune_module = f"layers.{layer}.{hf_to_tune[hf_module]}"
        heads = _qk_heads(tune_module, info)
        if which == "b" and heads is not None:
            if value.shape[0] != heads * info.head_dim:
                raise ValueError(
                    f"{key} has {value.shape[0]} rows; this base model's {tune_module} has "
                    f"{heads * info.head_dim} (an adapter for a different base model?)"
                )
            value = _unpermute_rows(value, heads, info.head_dim)
        out[f"{tune_module}.lora_{which}.weight"] = value.contiguous()
    return out


def peft_target_modules(lora_attn_modules: List[str], apply_lora_to_mlp: bool, apply_lora_to_output: bool) -> List[str]:
    """PEFT ``target_modules`` names of torchtune's LoRA options."""
    targets = list(lora_attn_modules)
    if apply_lora_to_mlp:
        targets += ["w1", "w2", "w3"]
    if apply_lora_to_output:
        targets.append("output")
    return [_TUNE_TO_PEFT_TARGET[t] for t in targets]


def peft_adapter_config(
    *,
    lora_rank: int,
    lora_alpha: float,
    lora_dropout: float,
    lora_attn_modules: List[str],
    apply_lora_to_mlp: bool,
    apply_lora_to_output: bool,
    use_dora: bool,
    mas: Dict[str, Any],
    base_model_name_or_path: Optional[str] = None,
) -> Dict[str, Any]:
    """A PEFT ``adapter_config.json`` dict, with the MAS settings under ``"mas"``."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lora_rank,
        "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout,
        "target_modules": peft_target_modules(lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output),
        "use_dora": use_dora,
        "bias": "none",
        "base_model_name_or_path": base_model_name_or_path,
        "mas": mas,
    }


def merged_hf_state(model_state: Dict[str, Tensor], lora_rank: int, lora_alpha: float, info: HFModelInfo) -> Dict[str, Tensor]:
    """Fold LoRA into the base weights and convert to the HF layout of ``info.model_type``."""
    from torchtune.models import convert_weights
    from torchtune.modules.peft import get_merged_lora_ckpt

    merged = get_merged_lora_ckpt({k: v.clone() for k, v in model_state.items()}, rank=lora_rank, alpha=lora_alpha)
    if info.model_type == "QWEN2":
        from torchtune.models.qwen2._convert_weights import qwen2_tune_to_hf

        hf = qwen2_tune_to_hf(
            merged,
            num_heads=info.num_heads,
            num_kv_heads=info.num_kv_heads,
            dim=info.dim,
            tie_word_embeddings=info.tie_word_embeddings,
        )
    else:
        hf = convert_weights.tune_to_hf(
            merged, num_heads=info.num_heads, num_kv_heads=info.num_kv_heads, dim=info.dim, head_dim=info.head_dim
        )
    if info.tie_word_embeddings:
        hf.pop("lm_head.weight", None)
    return {k: v.contiguous() for k, v in hf.items()}


def latest_checkpoint(output_dir: str | os.PathLike) -> Optional[Path]:
    """The newest complete checkpoint folder of a run, or None.

    ``checkpoints/latest`` names it; when that names no complete checkpoint (a step folder
    deleted by hand, a lost pointer), the newest complete one is used, with a warning.
    """
    root = Path(output_dir) / "checkpoints"
    pointer = root / LATEST_FILE
    named = pointer.read_text().strip() if pointer.is_file() else None
    if named and (root / named / RECIPE_STATE_FILE).exists():
        return root / named
    if not root.is_dir():
        return None
    # Names are zero-padded step numbers, so name order is step order; *.tmp were never published.
    complete = sorted(
        p for p in root.iterdir() if p.is_dir() and not p.name.endswith(".tmp") and (p / RECIPE_STATE_FILE).exists()
    )
    if not complete:
        return None
    stale = f"names {named}, which is not a complete checkpoint" if named else "is missing"
    log.warning("%s %s; using the newest complete checkpoint, %s", pointer, stale, complete[-1])
    return complete[-1]


def _step_of(folder: Path) -> Optional[int]:
    """The step of a ``step_N`` folder name, or None for any other name."""
    prefix, _, number = folder.name.partition("_")
    return int(number) if prefix == "step" and number.isdigit() else None


def step_checkpoints(output_dir: str | os.PathLike) -> Dict[int, Path]:
    """A run's complete step checkpoints, by step, in step order (empty when there are none)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return {}
    found = {
        step: p
        for p in root.iterdir()
        if p.is_dir() and (step := _step_of(p)) is not None and (p / RECIPE_STATE_FILE).exists()
    }
    return dict(sorted(found.items()))


def load_peft_adapter(folder: str | os.PathLike) -> tuple[Dict[str, Tensor], Dict[str, Any]]:
    """(PEFT adapter weights, adapter_config dict) from a checkpoint or adapter folder.

    Raises:
        FileNotFoundError: naming the missing file.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    weights, config = folder / ADAPTER_WEIGHTS_FILE, folder / ADAPTER_CONFIG_FILE
    for path in (weights, config):
        if not path.exists():
            raise FileNotFoundError(f"adapter file not found: {path}")
    return load_file(str(weights)), json.loads(config.read_text())


class CheckpointWriter:
    """Atomic step checkpoints under ``output_dir/checkpoints``.

    Args:
        output_dir (str): the run's output folder.
        keep_last_n (Optional[int]): delete older complete checkpoints beyond this many
            (epoch-end checkpoints included). None keeps all.
        keep_steps (Collection[int]): checkpoints of these steps are never deleted by
            ``keep_last_n`` (nor counted in it).
    """

    def __init__(self, output_dir: str | os.PathLike, keep_last_n: Optional[int] = None, keep_steps: Collection[int] = ()) -> None:
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last_n = keep_last_n
        self.keep_steps = frozenset(keep_steps)

    def save(
        self,
        name: str,
        *,
        peft_weights: Dict[str, Tensor],
        adapter_config: Dict[str, Any],
        recipe_state: Dict[str, Any],
        merged_weights: Optional[Dict[str, Tensor]] = None,
        hf_config: Optional[Dict[str, Any]] = None,
        base_checkpoint_dir: Optional[str | os.PathLike] = None,
    ) -> Path:
        """Write one checkpoint folder, then publish it (rename + ``latest``).

        Returns:
            Path: the complete checkpoint folder.
        """
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob("*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        final = self.root / name
        tmp = self.root / f"{name}.tmp"
        tmp.mkdir()
        save_file(peft_weights, str(tmp / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2) + "\n")
        if merged_weights is not None:
            merged = tmp / MERGED_DIR
            merged.mkdir()
            save_file(merged_weights, str(merged / "model.safetensors"), metadata={"format": "pt"})
            (merged / "config.json").write_text(json.dumps(hf_config or {}, indent=2) + "\n")
            if base_checkpoint_dir is not None:
                _copy_tokenizer_files(Path(base_checkpoint_dir), merged)
        # The recipe state goes last: its presence marks the folder as complete.
        torch.save(recipe_state, tmp / RECIPE_STATE_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_text_atomic(self.root / LATEST_FILE, name)
        self._prune(keep=final)
        return final

    def _prune(self, keep: Path) -> None:
        if not self.keep_last_n:
            return
        # Names are zero-padded step numbers, so name order is step order.
        complete = sorted(
            p for p in self.root.iterdir() if p.is_dir() and (p / RECIPE_STATE_FILE).exists() and _step_of(p) not in self.keep_steps
        )
        for old in complete[: -self.keep_last_n]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp-write")
    tmp.write_text(text)
    os.replace(tmp, path)


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)


def _copy_tokenizer_files(base_dir: Path, merged_dir: Path) -> None:
    # A merged checkpoint should be a complete HF model folder: bring the tokenizer along.
    for name in _TOKENIZER_FILES:
        src = base_dir / name
        if src.exists():
            shutil.copy2(src, merged_dir / name)
    original = base_dir / "original" / "tokenizer.model"
    if original.exists():
        (merged_dir / "original").mkdir(exist_ok=True)
        shutil.copy2(original, merged_dir / "original" / "tokenizer.model")


def hf_info_from_checkpointer(checkpointer: Any) -> HFModelInfo:
    """:class:`HFModelInfo` of a torchtune ``FullModelHFCheckpointer`` (the seam to torchtune)."""
    checkpoint_dir = getattr(checkpointer, "_checkpoint_dir", None)
    model_type = getattr(checkpointer, "_model_type", None)
    if checkpoint_dir is None or model_type is None:
        raise TypeError(
            f"{type(checkpointer).__name__} is not supported: use torchtune.training.FullModelHFCheckpointer "
            "(Hugging Face safetensors layout)"
        )
    return HFModelInfo.from_checkpoint_dir(checkpoint_dir, getattr(model_type, "name", str(model_type)))
