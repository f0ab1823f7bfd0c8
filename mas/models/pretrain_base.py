"""A small causal base model pre-trained on your own rows: the fastest way to try MAS on a new task.

MAS adapts *causally pre-trained* models. The embedded tiny model is pre-trained on the bundled
commonsense prompts; for a task of your own, :func:`write_tiny_base` pre-trains the same tiny
Llama-3.2 architecture (any size) on your rows instead, with a plain causal language-modelling
loss, and writes it in the Hugging Face layout that torchtune's ``FullModelHFCheckpointer``
loads (so every recipe loads it: see :data:`CHECKPOINTER_OVERRIDES`). On a CPU, a few hundred
steps take a minute or two. ``tools/pretrain_tiny_base.py`` is its command line and
``docs/own_task.md`` the worked example.

Which text it learns from each row (``.json``/``.jsonl`` rows or a ``.txt`` file):

- ``text`` rows (or a ``.txt`` file, one paragraph per blank-line-separated block): the text;
- commonsense/Alpaca rows (``instruction``, optional ``input``, ``output``): the prompt in the
  fine-tuning template, without the answer unless ``include_answers`` (as the embedded model:
  the base knows the language of the task, fine-tuning teaches the answer); with
  ``random_answers`` the whole row, its ``answer`` replaced in ``output`` by a label drawn at
  random (a *format-only* base: it knows how a question is answered, not which answer is right,
  so a fine-tune must learn the task itself);
- chat rows (``messages``): the system and user turns (and the assistant's with
  ``include_answers``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from torchtune.models.llama3 import Llama3Tokenizer

from mas.data.formats import instruction_messages
from mas.data.rows import load_rows, optional_text, require_list, require_text
from mas.errors import ConfigError, DataError
from mas.models._hf_layout import HF_WEIGHTS_FILE, check_replaceable_model_dir, write_hf_model
from mas.models._tiny import TINY_LLAMA3_2, pretrain_causal_lm, seeded_tiny_model, tiny_llama3_tokenizer

__all__ = ["BASE_RECIPE_FILE", "CHECKPOINTER_OVERRIDES", "pretrain_causal_lm", "row_texts", "write_tiny_base"]

#: What :func:`write_tiny_base` records beside the weights (data, steps, seed, dims, losses).
BASE_RECIPE_FILE = "base_recipe.json"
#: Overrides that make a recipe load a base written here (``{dir}``: its folder).
CHECKPOINTER_OVERRIDES = (
    "checkpointer._component_=torchtune.training.FullModelHFCheckpointer",
    "checkpointer.checkpoint_dir={dir}",
    f"checkpointer.checkpoint_files=[{HF_WEIGHTS_FILE}]",
    "checkpointer.model_type=LLAMA3_2",
    "~checkpointer.pretrain_steps",
)


def _message_text(messages: Sequence[Any]) -> str:
    return "".join(m.text_content for m in messages)


def row_texts(
    source: str | os.PathLike,
    include_answers: bool = False,
    random_answers: Optional[Sequence[str]] = None,
    seed: int = 0,
) -> List[str]:
    """The texts to pre-train on, one per row (see the module docstring for each row kind).

    Args:
        source: a ``.json``/``.jsonl`` file of rows or a ``.txt`` file.
        include_answers (bool): learn the answers of prompt/answer rows too.
        random_answers (Optional[Sequence[str]]): labels; each commonsense/Alpaca row's
            ``answer`` is replaced in its ``output`` by one of them, drawn at random (implies the
            answers are learnt: a format-only base).
        seed (int): seeds the draws of ``random_answers``.

    Raises:
        DataError: a missing file, or a row that is none of the known kinds (naming the row);
            with ``random_answers``, a row whose ``output`` does not contain its ``answer``.
    """
    path = Path(source).expanduser()
    if path.suffix == ".txt":
        if not path.is_file():
            raise DataError(f"text file not found: {path}")
        blocks = [b.strip() for b in path.read_text(encoding="utf-8").split("\n\n")]
        return [b for b in blocks if b]
    rows = load_rows(str(path))
    texts = []
    draw = random.Random(seed)
    for i, row in enumerate(rows.rows):
        if random_answers:
            row = _with_random_answer(row, rows.where(i), random_answers, draw)
        texts.append(_row_text(row, rows.where(i), include_answers or bool(random_answers)))
    if not texts:
        raise DataError(f"{rows.name}: no rows to pre-train on")
    return texts


def _with_random_answer(row: Mapping[str, Any], where: str, labels: Sequence[str], draw: random.Random) -> Mapping[str, Any]:
    """``row`` with the last occurrence of its ``answer`` in ``output`` replaced by a random label."""
    if "instruction" not in row:
        raise DataError(f"{where}: random answers need commonsense/Alpaca rows (instruction, output, answer), got {sorted(row)}")
    answer, output = require_text(row, "answer", where), require_text(row, "output", where)
    cut = output.rfind(answer)
    if not answer or cut < 0:
        raise DataError(f"{where}: its output {output!r} does not contain its answer {answer!r}, so the answer cannot be replaced")
    label = draw.choice(list(labels))
    return {**row, "output": output[:cut] + label + output[cut + len(answer) :]}


def _row_text(row: Mapping[str, Any], where: str, include_answers: bool) -> str:
    # A field that is present is a string: null or a number would be pre-trained on as "None"/"5".
    if "text" in row:
        return require_text(row, "text", where)
    if "instruction" in row:
        output = optional_text(row, "output", where) if include_answers else None
        return _message_text(instruction_messages(require_text(row, "instruction", where), optional_text(row, "input", where), output or None))
    if "messages" in row:
        turns = require_list(row, "messages", where)
        for j, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise DataError(f"{where}, messages[{j}]: expected a mapping with 'role' and 'content', got {type(turn).__name__}")
            require_text(turn, "content", f"{where}, messages[{j}]")
        return "".join(m["content"] for m in turns if include_answers or m.get("role") != "assistant")
    raise DataError(f"{where}: no 'text', 'instruction' or 'messages' field to pre-train on (row has {sorted(row)})")


def _sequences(texts: Sequence[str], tokenizer: Llama3Tokenizer, max_len: int) -> List[List[int]]:
    return [[tokenizer.bos_id] + tokenizer.encode(t, add_bos=False, add_eos=False)[: max_len - 1] for t in texts]


def write_tiny_base(
    source: str | os.PathLike,
    checkpoint_dir: str | os.PathLike,
    *,
    steps: int = 300,
    seed: int = 0,
    include_answers: bool = False,
    random_answers: Optional[Sequence[str]] = None,
    max_len: int = 256,
    batch_size: int = 16,
    lr: float = 3e-3,
    dims: Optional[Mapping[str, int]] = None,
) -> Path:
    """Pre-train a tiny Llama 3.2 on the rows of ``source`` and write it as an HF checkpoint.

    Args:
        source: a ``.json``/``.jsonl`` file of rows or a ``.txt`` file (module docstring).
        checkpoint_dir: the folder to write (``config.json``, ``model.safetensors``,
            :data:`BASE_RECIPE_FILE`); replaced if it holds an earlier base written here and
            nothing else, refused if it holds anything else.
        steps (int): pre-training steps.
        seed (int): init and batch-order seed.
        include_answers (bool): learn the answers of prompt/answer rows too.
        random_answers (Optional[Sequence[str]]): learn whole rows with each answer replaced by
            one of these labels, drawn with ``seed`` (a format-only base; module docstring).
        max_len (int): tokens kept per row.
        batch_size (int): rows per step.
        lr (float): learning rate.
        dims: model size overrides of :data:`~mas.models.TINY_LLAMA3_2` (``embed_dim``,
            ``num_layers``, ``num_heads``, ``num_kv_heads``, ``intermediate_dim``); pass the same
            values to the recipes' ``model`` node.

    Returns:
        Path: ``checkpoint_dir``.

    Raises:
        DataError: unusable rows. ConfigError: ``steps`` < 1 or a folder holding files this tool
        did not write, or an unknown dimension.
    """
    dims = dict(dims or {})
    unknown = sorted(set(dims) - set(TINY_LLAMA3_2))
    if unknown:
        raise ConfigError(f"unknown model dimension {unknown[0]!r}; known: {', '.join(TINY_LLAMA3_2)}")
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}: a base needs pre-training (--steps)")
    checkpoint_dir = Path(os.path.expandvars(checkpoint_dir)).expanduser()
    check_replaceable_model_dir(checkpoint_dir, marker=BASE_RECIPE_FILE, writer="pretrain_tiny_base", key="out")
    tokenizer = tiny_llama3_tokenizer()
    texts = row_texts(source, include_answers, random_answers, seed)
    sequences = _sequences(texts, tokenizer, max_len)
    full_dims = {**TINY_LLAMA3_2, **dims}
    model, losses = seeded_tiny_model(
        seed, dims, sequences, steps=steps, pad_id=tokenizer.pad_id, batch_size=batch_size, lr=lr,
        progress=f"pre-training {checkpoint_dir.name}",
    )
    checkpoint_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=checkpoint_dir.name + ".", dir=checkpoint_dir.parent))
    write_hf_model(
        staging, model.state_dict(), "LLAMA3_2", full_dims, tie_word_embeddings=True,
        extra_config={"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id},
    )  # fmt: skip
    recipe: Dict[str, Any] = {
        "source": str(Path(source).expanduser().resolve()),
        "rows": len(texts),
        "include_answers": include_answers,
        "random_answers": list(random_answers) if random_answers else None,
        "steps": steps,
        "seed": seed,
        "batch_size": batch_size,
        "lr": lr,
        "max_len": max_len,
        "dims": full_dims,
        "loss": {"first": losses[0], "last": losses[-1]} if losses else None,
    }
    (staging / BASE_RECIPE_FILE).write_text(json.dumps(recipe, indent=2) + "\n")
    if checkpoint_dir.exists():
        try:  # again: the folder may have changed while the model trained
            check_replaceable_model_dir(checkpoint_dir, marker=BASE_RECIPE_FILE, writer="pretrain_tiny_base", key="out")
        except ConfigError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        shutil.rmtree(checkpoint_dir)
    os.replace(staging, checkpoint_dir)
    return checkpoint_dir
