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
from typing import Any, Dict, List

import mas

if getattr(mas, "__file__", None) is None:  # a plain folder named "mas" in the working directory
    sys.exit(f"a folder named 'mas' in {list(mas.__path__)} shadows the installed mas package; run from another directory")

from omegaconf import DictConfig, OmegaConf

from mas.config import ConfigError, RecipeKeys, instantiate, parse, run_reporting_user_errors
from mas.data import DataError, instruction_messages, load_rows
from mas.devices import resolve_device
from mas.generation import GenerationSettings, generate, prompt_messages
from mas.generation.loading import (
    INFERENCE_KEYS_OPTIONAL,
    INFERENCE_KEYS_REQUIRED,
    load_inference_model,
    prompt_mismatch_warnings,
)

log = logging.getLogger("mas_generate")

KEYS = RecipeKeys(
    recipe="mas_generate",
    required=INFERENCE_KEYS_REQUIRED,
    optional={
        **INFERENCE_KEYS_OPTIONAL,
        "output_dir": "where output_file defaults to",
        "prompt": "{system, user} or a string",
        "prompts_file": "JSONL of prompts",
        "output_file": "JSONL of completions (null: print only)",
        "temperature": "0 = greedy",
        "top_k": "top-k filter",
        "top_p": "nucleus filter",
        "stop_tokens": "ids that end generation (null: the tokenizer's)",
    },
)


def _prompts_from_file(path: str) -> List[Any]:
    rows = load_rows(path)
    prompts = []
    for i, row in enumerate(rows):
        where = rows.where(i)
        if "instruction" in row:
            prompts.append(instruction_messages(str(row["instruction"]), str(row.get("input") or "")))
        elif "prompt" in row:
            prompts.append(row["prompt"])
        elif "messages" in row or "user" in row:
            prompts.append({k: v for k, v in row.items() if k in ("system", "user", "messages")})
        else:
            raise DataError(f"{where}: expected 'user', 'messages', 'prompt' or 'instruction', got {sorted(row)}")
    return prompts


def load_prompts(cfg: DictConfig) -> List[Any]:
    """The prompts of a generate config (``prompts_file`` wins over ``prompt``)."""
    if cfg.get("prompts_file"):
        return _prompts_from_file(cfg.prompts_file)
    prompt = cfg.get("prompt")
    if prompt is None:
        raise ConfigError("give prompt: {system: ..., user: ...} or prompts_file: path.jsonl")
    return [OmegaConf.to_container(prompt) if isinstance(prompt, DictConfig) else str(prompt)]


def settings_from(cfg: DictConfig) -> GenerationSettings:
    stop = cfg.get("stop_tokens")
    return GenerationSettings(
        attention=cfg.attention,
        max_new_tokens=int(cfg.get("max_new_tokens", 64)),
        temperature=float(cfg.get("temperature", 0.0)),
        top_k=cfg.get("top_k"),
        top_p=cfg.get("top_p"),
        stop_tokens=list(stop) if stop is not None else None,
        seed=cfg.get("seed"),
        batch_size=int(cfg.get("batch_size", 8)),
        reuse_system_cache=bool(cfg.get("reuse_system_cache", False)),
        compile_decode=bool(cfg.get("compile_decode", False)),
        max_cache_len=cfg.get("max_cache_len"),
        attention_backend=cfg.get("attention_backend", "auto"),
    )


def run(cfg: DictConfig) -> Dict[str, Any]:
    from torchtune import training

    device = resolve_device(cfg.get("device", "auto"))
    dtype = training.get_dtype(cfg.get("dtype", "fp32"), device=device)
    settings = settings_from(cfg)
    prompts = load_prompts(cfg)
    for i, p in enumerate(prompts):
        prompt_messages(p, i)  # validate before loading weights
    tokenizer = instantiate(cfg.tokenizer)
    loaded = load_inference_model(
        cfg.model,
        cfg.checkpointer,
        adapter_checkpoint=cfg.get("adapter_checkpoint"),
        device=device,
        dtype=dtype,
        attention_backend=settings.attention_backend,
    )
    prompt_format = cfg.get("prompt_format", "text")
    merge = bool(cfg.get("merge_system_and_user", False))
    for note in prompt_mismatch_warnings(loaded, settings.attention, prompt_format, merge):
        log.warning(note)
    result = generate(loaded.model, tokenizer, prompts, settings=settings, prompt_format=prompt_format, merge_system_and_user=merge)
    for i, text in enumerate(result.texts):
        print(f"--- completion {i} ---\n{text}")
    print(
        f"time to first token: {result.time_to_first_token_s * 1e3:.1f} ms (mean per batch), "
        f"decode: {result.decode_tokens_per_s:.1f} tokens/s, prompts: {len(prompts)}"
    )
    output_file = cfg.get("output_file")
    if output_file:
        path = Path(output_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            for i, (seq, ids, text) in enumerate(zip(result.prompts, result.tokens, result.texts)):
                f.write(json.dumps({"index": i, "prompt": tokenizer.decode(seq.tokens), "completion": text, "completion_ids": ids}) + "\n")
        print(f"completions written to {path}")
    return {"texts": result.texts, "tokens": result.tokens}


@parse(KEYS)
def recipe_main(cfg: DictConfig) -> int:
    return run_reporting_user_errors(KEYS.recipe, run, cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
