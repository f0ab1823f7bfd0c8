"""The embedded default: a tiny Llama-3.2-architecture model, its tokenizer and HF checkpoint.

Everything here runs offline. The tokenizer ships in ``mas/assets/tiny_tokenizer`` (a byte-level
BPE trained by ``tools/make_tiny_tokenizer.py`` on the bundled commonsense rows, with Llama 3's
special tokens after the base vocabulary). The weights are deterministic: a seeded random init,
then a short causal-LM pre-training on the bundled prompts (never their answers), because MAS
adapts *causally pre-trained* models. The first use writes them as a Hugging Face layout
checkpoint (``config.json`` + ``model.safetensors``, :mod:`mas.models._hf_layout`), which
torchtune's ``FullModelHFCheckpointer`` then loads exactly as it loads a downloaded Llama 3.2, so
the tiny runs exercise the real-model code path. The test families of :mod:`mas.testing` reuse
these dimensions for their ``llama3_2`` stand-in.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torchtune.models.llama3 import Llama3Tokenizer, llama3_tokenizer
from torchtune.models.llama3_2 import llama3_2, lora_llama3_2
from torchtune.modules import TransformerDecoder
from torchtune.training import FullModelHFCheckpointer

from mas.assets import TINY_TOKENIZER_DIR, commonsense_train_rows
from mas.data.formats import instruction_messages
from mas.errors import ConfigError
from mas.models._hf_layout import HF_WEIGHTS_FILE, check_replaceable_model_dir, write_hf_model
from mas.progress import Progress

__all__ = [
    "TINY_LLAMA3_2",
    "lora_tiny_llama3_2",
    "pretrain_causal_lm",
    "pretrain_tiny_model",
    "seeded_tiny_model",
    "tiny_hf_checkpointer",
    "tiny_llama3_2",
    "tiny_llama3_tokenizer",
    "write_tiny_hf_checkpoint",
]

#: Dimensions of the tiny model (a Llama 3.2 with GQA, tied embeddings, scaled RoPE).
TINY_LLAMA3_2: Dict[str, Any] = dict(
    vocab_size=1024,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    embed_dim=64,
    intermediate_dim=192,
    max_seq_len=1024,
    rope_base=500_000,
    norm_eps=1e-5,
    scale_factor=32,
)


def tiny_llama3_tokenizer(
    max_seq_len: Optional[int] = None, prompt_template: Optional[Any] = None
) -> Llama3Tokenizer:
    """The bundled tiny Llama 3 tokenizer (1024 ids: 992 BPE tokens, 32 special tokens)."""
    return llama3_tokenizer(
        str(TINY_TOKENIZER_DIR / "tokenizer.model"),
        special_tokens_path=str(TINY_TOKENIZER_DIR / "special_tokens.json"),
        max_seq_len=max_seq_len,
        prompt_template=prompt_template,
    )


def _dims(arguments: Dict[str, Any]) -> Dict[str, Any]:
    """The dimension arguments among a builder's ``locals()`` (explicit signatures keep config
    validation able to reject misspelt keys; this keeps them from being listed twice)."""
    return {k: v for k, v in arguments.items() if k in TINY_LLAMA3_2}


def tiny_llama3_2(
    vocab_size: int = TINY_LLAMA3_2["vocab_size"],
    num_layers: int = TINY_LLAMA3_2["num_layers"],
    num_heads: int = TINY_LLAMA3_2["num_heads"],
    num_kv_heads: int = TINY_LLAMA3_2["num_kv_heads"],
    embed_dim: int = TINY_LLAMA3_2["embed_dim"],
    intermediate_dim: int = TINY_LLAMA3_2["intermediate_dim"],
    max_seq_len: int = TINY_LLAMA3_2["max_seq_len"],
) -> TransformerDecoder:
    """The tiny Llama 3.2 model (defaults: :data:`TINY_LLAMA3_2`)."""
    dims = _dims(locals())
    return llama3_2(**{**TINY_LLAMA3_2, **dims})


def lora_tiny_llama3_2(
    lora_attn_modules: List[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    vocab_size: int = TINY_LLAMA3_2["vocab_size"],
    num_layers: int = TINY_LLAMA3_2["num_layers"],
    num_heads: int = TINY_LLAMA3_2["num_heads"],
    num_kv_heads: int = TINY_LLAMA3_2["num_kv_heads"],
    embed_dim: int = TINY_LLAMA3_2["embed_dim"],
    intermediate_dim: int = TINY_LLAMA3_2["intermediate_dim"],
    max_seq_len: int = TINY_LLAMA3_2["max_seq_len"],
) -> TransformerDecoder:
    """The tiny Llama 3.2 model with LoRA adapters (same arguments as torchtune's builders)."""
    dims = _dims(locals())
    return lora_llama3_2(
        lora_attn_modules=list(lora_attn_modules),
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        **{**TINY_LLAMA3_2, **dims},
    )


def _pretraining_sequences(tokenizer: Llama3Tokenizer, max_len: int = 256) -> List[List[int]]:
    # Prompts only (preamble + instruction + response cue), never the answers: the base model
    # knows the language of the task but not the answer format, which fine-tuning then teaches.
    sequences = []
    for row in commonsense_train_rows():
        text = "".join(m.content[0]["content"] for m in instruction_messages(row["instruction"], row["input"]))
        sequences.append([tokenizer.bos_id] + tokenizer.encode(text, add_bos=False, add_eos=False)[: max_len - 1])
    return sequences


def pretrain_causal_lm(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    *,
    steps: int,
    seed: int,
    pad_id: int,
    batch_size: int = 16,
    lr: float = 3e-3,
    progress: Optional[str] = None,
) -> List[float]:
    """Causal-LM pre-training on token sequences (deterministic: seeded picks, one thread).

    Args:
        model (nn.Module): a torchtune decoder; ``model(tokens)`` gives ``[b, s, vocab]`` logits.
        sequences: token ids per example (each starting with BOS).
        steps (int): optimizer steps.
        seed (int): the seed of the batch picks.
        pad_id (int): padding id (never a target).
        batch_size (int): sequences per step.
        lr (float): AdamW learning rate.
        progress (Optional[str]): what the wait is called: a bar on a terminal, a plain line every
            few seconds anywhere else (:class:`mas.progress.Progress`); None: nothing shown.

    Returns:
        List[float]: the loss of every step.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # float sums in one fixed order: the same weights on every run
    losses = []
    shown = Progress(steps, progress or "", unit="steps", enabled=progress is not None, leave=False)
    try:
        for _ in range(steps):
            picks = torch.randint(len(sequences), (batch_size,), generator=generator).tolist()
            length = max(len(sequences[i]) for i in picks)
            tokens = torch.full((batch_size, length), pad_id)  # [b, s]
            targets = torch.full((batch_size, length), -100)  # [b, s]: position i predicts token i + 1
            for row, i in enumerate(picks):
                seq = torch.tensor(sequences[i])
                tokens[row, : len(seq)] = seq
                targets[row, : len(seq) - 1] = seq[1:]
            logits = model(tokens)  # [b, s, vocab]
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            shown.set_postfix(loss=f"{losses[-1]:.3f}")
            shown.update()
    finally:
        torch.set_num_threads(threads)
        shown.close()
    return losses


def pretrain_tiny_model(model: TransformerDecoder, steps: int, seed: int, batch_size: int = 16) -> List[float]:
    """Causal-LM pre-training of the tiny model on the bundled prompts (deterministic, 1 thread).

    The paper adapts *causally pre-trained* models to MAS; a few hundred steps give the tiny model
    that property. Returns the loss curve.
    """
    tokenizer = tiny_llama3_tokenizer()
    return pretrain_causal_lm(
        model, _pretraining_sequences(tokenizer), steps=steps, seed=seed, pad_id=tokenizer.pad_id, batch_size=batch_size
    )


def seeded_tiny_model(
    seed: int, dims: Mapping[str, int], sequences: Sequence[Sequence[int]], *, steps: int, pad_id: int,
    batch_size: int = 16, lr: float = 3e-3, progress: Optional[str] = None,
) -> Tuple[TransformerDecoder, List[float]]:
    """A tiny Llama 3.2 from a seeded init, pre-trained ``steps`` on ``sequences`` (0: the init).

    The global RNG is left as it was. Returns the model and its loss curve.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tiny_llama3_2(**dims)
        # Embeddings come out of torchtune's builder as N(0, 1), which saturates a 64-dim model.
        with torch.no_grad():
            model.tok_embeddings.weight.mul_(0.02)
        losses = (
            pretrain_causal_lm(model, sequences, steps=steps, seed=seed, pad_id=pad_id, batch_size=batch_size, lr=lr, progress=progress)
            if steps
            else []
        )
    return model, losses


def write_tiny_hf_checkpoint(
    checkpoint_dir: str | os.PathLike, seed: int = 0, pretrain_steps: int = 200, *,
    key: str = "checkpoint_dir", **overrides: Any,
) -> Path:
    """Write the tiny model in the HF Llama layout (``config.json``, ``model.safetensors``).

    Weights: a seeded random init, then ``pretrain_steps`` of causal-LM pre-training on the
    bundled prompts (0 keeps the random init). The folder is built aside and renamed into place,
    so concurrent runs never see half a checkpoint.

    Args:
        checkpoint_dir: folder to create; an earlier tiny checkpoint there (marked by
            :data:`TINY_RECIPE_FILE`) is replaced, a folder holding anything else is refused.
        seed (int): init and data-order seed.
        pretrain_steps (int): causal pre-training steps.
        key (str): the config key or argument that named the folder (for the refusal).
        **overrides: dimension overrides (see :data:`TINY_LLAMA3_2`).

    Returns:
        Path: ``checkpoint_dir``.

    Raises:
        ConfigError: the folder holds files the writer did not make.
    """
    dims = {**TINY_LLAMA3_2, **overrides}
    checkpoint_dir = Path(checkpoint_dir)
    check_replaceable_model_dir(checkpoint_dir, marker=TINY_RECIPE_FILE, writer="the tiny model's writer", key=key)
    checkpoint_dir.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_llama3_tokenizer()
    model, losses = seeded_tiny_model(
        seed, overrides, _pretraining_sequences(tokenizer), steps=pretrain_steps, pad_id=tokenizer.pad_id,
        progress=f"pre-training the tiny base once ({checkpoint_dir})",
    )
    staging = Path(tempfile.mkdtemp(prefix=checkpoint_dir.name + ".", dir=checkpoint_dir.parent))
    # The tiny tokenizer's <|begin_of_text|> and <|end_of_text|> follow its 992 BPE tokens.
    write_hf_model(
        staging, model.state_dict(), "LLAMA3_2", dims, tie_word_embeddings=True,
        extra_config={"bos_token_id": 992, "eos_token_id": 993},
    )
    recipe = _tiny_recipe(seed, pretrain_steps, dims)
    recipe["pretraining_loss"] = {"first": losses[0], "last": losses[-1]} if losses else None
    (staging / TINY_RECIPE_FILE).write_text(json.dumps(recipe, indent=2) + "\n")
    if checkpoint_dir.exists():
        try:  # again: the folder may have changed while the model trained
            check_replaceable_model_dir(checkpoint_dir, marker=TINY_RECIPE_FILE, writer="the tiny model's writer", key=key)
        except ConfigError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        shutil.rmtree(checkpoint_dir)
    try:
        os.replace(staging, checkpoint_dir)
    except OSError:  # another process published it first: use theirs
        shutil.rmtree(staging, ignore_errors=True)
    return checkpoint_dir


TINY_RECIPE_FILE = "tiny_model_recipe.json"


def _tiny_recipe(seed: int, pretrain_steps: int, dims: Dict[str, Any]) -> Dict[str, Any]:
    return {"seed": seed, "pretrain_steps": pretrain_steps, "dims": dims, "format": 1}


def _tiny_checkpoint_is_current(checkpoint_dir: Path, seed: int, pretrain_steps: int, dims: Dict[str, Any]) -> bool:
    path = checkpoint_dir / TINY_RECIPE_FILE
    if not (checkpoint_dir / HF_WEIGHTS_FILE).exists() or not path.exists():
        return False
    recorded = json.loads(path.read_text())
    recorded.pop("pretraining_loss", None)
    return recorded == json.loads(json.dumps(_tiny_recipe(seed, pretrain_steps, dims)))


def tiny_hf_checkpointer(
    checkpoint_dir: str,
    output_dir: str,
    seed: int = 0,
    pretrain_steps: int = 200,
    vocab_size: int = TINY_LLAMA3_2["vocab_size"],
    num_layers: int = TINY_LLAMA3_2["num_layers"],
    num_heads: int = TINY_LLAMA3_2["num_heads"],
    num_kv_heads: int = TINY_LLAMA3_2["num_kv_heads"],
    embed_dim: int = TINY_LLAMA3_2["embed_dim"],
    intermediate_dim: int = TINY_LLAMA3_2["intermediate_dim"],
    max_seq_len: int = TINY_LLAMA3_2["max_seq_len"],
):
    """torchtune's ``FullModelHFCheckpointer`` over the tiny checkpoint, written on first use.

    The checkpoint is reused while its recorded recipe (seed, steps, dims) matches, and rebuilt
    otherwise, so one ``checkpoint_dir`` can be shared by many runs.

    Args:
        checkpoint_dir (str): where the tiny HF checkpoint lives (created if missing).
        output_dir (str): the run's output folder (torchtune's checkpointer requires one).
        seed (int): weight seed.
        pretrain_steps (int): causal pre-training steps (0: random weights).
        vocab_size, num_layers, ...: dimensions; must match the model builder's.
    """
    overrides = _dims(locals())
    dims = {**TINY_LLAMA3_2, **overrides}
    # Under torchrun one rank writes the checkpoint and the others wait for it.
    distributed = dist.is_available() and dist.is_initialized()
    folder = Path(checkpoint_dir)
    if (folder / HF_WEIGHTS_FILE).exists() and not (folder / TINY_RECIPE_FILE).exists():
        # Never replace weights this function did not write (a merged checkpoint, a real model).
        raise ConfigError(
            f"{folder} holds a checkpoint that is not the embedded tiny model; load it with "
            "checkpointer._component_=torchtune.training.FullModelHFCheckpointer "
            "checkpointer.checkpoint_files=[model.safetensors] checkpointer.model_type=LLAMA3_2 "
            "'~checkpointer.pretrain_steps'"
        )
    if not _tiny_checkpoint_is_current(folder, seed, pretrain_steps, dims):
        # Checked on every rank, so all of them stop on a user's folder.
        check_replaceable_model_dir(
            folder, marker=TINY_RECIPE_FILE, writer="the tiny model's checkpointer", key="checkpointer.checkpoint_dir"
        )
    if not distributed or dist.get_rank() == 0:
        if not _tiny_checkpoint_is_current(folder, seed, pretrain_steps, dims):
            write_tiny_hf_checkpoint(
                checkpoint_dir, seed=seed, pretrain_steps=pretrain_steps, key="checkpointer.checkpoint_dir", **overrides
            )
    if distributed:
        dist.barrier()
    return FullModelHFCheckpointer(
        checkpoint_dir=checkpoint_dir,
        checkpoint_files=[HF_WEIGHTS_FILE],
        model_type="LLAMA3_2",
        output_dir=output_dir,
    )
