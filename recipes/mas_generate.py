"""Generate with a MAS prefill and causal decoding.

    tune run mas_generate --config tiny_generate [key=value ...]
    tune run mas_generate --config tiny_generate adapter_checkpoint=/tmp/mas_runs/tiny_mas
    tune run mas_generate --config tiny_generate prompt.user="Is the sky blue?"

Prompts come from ``prompt`` (system/user) or ``prompts_file`` (JSONL: ``{"system", "user"}``,
``{"messages": [...]}``, ``{"prompt": "..."}``, or commonsense ``{"instruction", "input"}`` rows,
which get the fine-tuning template). They are segmented by the same builder as training.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, TextIO

import mas

if getattr(mas, "__file__", None) is None:  # a plain folder named "mas" in the working directory
    sys.exit(f"a folder named 'mas' in {list(mas.__path__)} shadows the installed mas package; run from another directory")

from omegaconf import DictConfig, OmegaConf

from mas.config import ConfigError, parse, run_reporting_user_errors, to_options
from mas.data import DataError, instruction_messages, load_rows
from mas.data.rows import optional_text, require_list, require_text
from mas.devices import resolve_device
from mas.generation import generate, prompt_messages
from mas.generation.loading import load_for_inference
from mas.generation.options import GenerateOptions, generation_settings, prompt_settings, with_prompt_settings

log = logging.getLogger("mas_generate")

RECIPE = "mas_generate"


def _checked_prompt(row: Any, where: str) -> Any:
    """A prompt that can be generated from: text fields are strings and a user message is there
    (a row of only a system prompt would generate a continuation of the system prompt)."""
    if isinstance(row, str):
        if not row.strip():
            raise DataError(f"{where}: the prompt is empty")
        return row
    if not isinstance(row, dict):
        raise DataError(f"{where}: a prompt is a string or a mapping with 'user' (and 'system'), got {type(row).__name__}")
    if "messages" in row:
        turns = require_list(row, "messages", where)
        roles = []
        for j, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise DataError(f"{where}: messages[{j}] must be a mapping with 'role' and 'content', got {type(turn).__name__}")
            role = require_text(turn, "role", f"{where}, messages[{j}]")
            if role not in ("system", "user", "assistant"):
                raise DataError(f"{where}, messages[{j}]: role must be system, user or assistant, got {role!r}")
            require_text(turn, "content", f"{where}, messages[{j}]")
            roles.append(role)
        if "user" not in roles:
            raise DataError(f"{where}: the messages have no user message (roles {roles}); add the user turn to answer")
        return {"messages": turns}
    user = require_text(row, "user", where)
    system = optional_text(row, "system", where)
    return {"system": system, "user": user} if system else {"user": user}


def _prompts_from_file(path: str) -> List[Any]:
    rows = load_rows(path)
    prompts = []
    for i, row in enumerate(rows):
        where = rows.where(i)
        if "instruction" in row:
            prompts.append(instruction_messages(require_text(row, "instruction", where), optional_text(row, "input", where)))
        elif "prompt" in row:
            prompts.append(_checked_prompt(row["prompt"], f"{where}, field 'prompt'"))
        elif "messages" in row or "user" in row or "system" in row:
            prompts.append(_checked_prompt({k: v for k, v in row.items() if k in ("system", "user", "messages")}, where))
        else:
            raise DataError(f"{where}: expected 'user', 'messages', 'prompt' or 'instruction', got {sorted(row)}")
    return prompts


def load_prompts(options: GenerateOptions) -> List[Any]:
    """The prompts of a generate config (``prompts_file`` wins over ``prompt``)."""
    if options.prompts_file:
        return _prompts_from_file(options.prompts_file)
    prompt = options.prompt
    if prompt is None:
        raise ConfigError("give prompt: {system: ..., user: ...} or prompts_file: path.jsonl")
    plain = OmegaConf.to_container(prompt) if isinstance(prompt, DictConfig) else prompt
    return [_checked_prompt(plain if isinstance(plain, dict) else str(plain), "prompt")]


def output_path(options: GenerateOptions) -> Optional[Path]:
    """Where completions go: ``output_file``, under ``output_dir`` when relative (null: printed only)."""
    if not options.output_file:
        return None
    path = Path(options.output_file)
    return Path(options.output_dir) / path if options.output_dir and not path.is_absolute() else path


def _open_output(path: Optional[Path]) -> Optional[TextIO]:
    """Open the output before any work, so an unwritable path fails before generating."""
    if path is None:
        return None
    if path.is_dir():
        raise ConfigError(f"output_file={path} is a folder; name a file (e.g. output_file={path / 'completions.jsonl'})")
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "w")


def run(cfg: DictConfig) -> Dict[str, Any]:
    options = to_options(cfg, GenerateOptions, RECIPE)
    destination = output_path(options)
    if destination and options.prompts_file and destination.resolve() == Path(options.prompts_file).resolve():
        raise ConfigError(f"output_file {destination} is the prompts_file; writing it would replace the prompts: name another output_file")
    resolve_device(options.device)  # a missing device fails before the prompts are read
    prompts = load_prompts(options)
    for i, p in enumerate(prompts):
        prompt_messages(p, i)  # validate before loading weights
    out = _open_output(destination)
    setup = load_for_inference(options, adapter_checkpoint=options.adapter_checkpoint)
    tokenizer, loaded = setup.tokenizer, setup.loaded
    chosen = prompt_settings((loaded.adapter_config or {}).get("mas"), options)
    for note in chosen.mismatches + chosen.notes:
        log.warning(note)
    options = with_prompt_settings(options, chosen)
    settings = generation_settings(
        options, rows=options.batch_size, temperature=options.temperature, top_k=options.top_k, top_p=options.top_p, stop_tokens=options.stop_tokens
    )
    try:
        result = generate(
            loaded.model, tokenizer, prompts, settings=settings, prompt_format=chosen.prompt_format, merge_system_and_user=chosen.merge_system_and_user
        )
    except DataError as e:  # mas.generate names the prompt that cannot run; say where it came from
        raise DataError(f"{options.prompts_file or 'prompt'}: {e}") from e
    for i, text in enumerate(result.texts):
        print(f"--- completion {i} ---\n{text}")
    print(
        f"time to first token: {result.time_to_first_token_s * 1e3:.1f} ms (mean per prompt), "
        f"decode: {result.decode_tokens_per_s:.1f} tokens/s, prompts: {len(prompts)}, "
        f"prompt tokens from the prefix cache: {result.cached_prompt_tokens}"
        + (f", compiling the decode step: {result.compile_seconds:.1f} s (not in the rate)" if result.compile_seconds else "")
    )
    if out is not None:
        with out:
            for i, (seq, ids, text) in enumerate(zip(result.prompts, result.tokens, result.texts)):
                out.write(json.dumps({"index": i, "prompt": tokenizer.decode(seq.tokens), "completion": text, "completion_ids": ids}) + "\n")
        print(f"completions written to {destination}")
    return {"texts": result.texts, "tokens": result.tokens}


@parse(RECIPE, GenerateOptions)
def recipe_main(cfg: DictConfig) -> int:
    return run_reporting_user_errors(RECIPE, run, cfg, on_interrupt="no completions were written; run the same command again")


if __name__ == "__main__":
    sys.exit(recipe_main())
