"""Serve a MAS fine-tuned model over an OpenAI-compatible HTTP API.

    tune run mas_serve --config tiny_serve                       # the embedded tiny model, offline
    tune run mas_serve --config tiny_serve adapter_checkpoint=/tmp/mas_runs/tiny_mas port=8001
    tune run mas_serve --config llama3_2_1b_serve adapter_checkpoint=/path/to/run
    tune run mas_serve --config tiny_serve compile_decode=True   # compiled decode forward (docs/serving.md)

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /health``, ``GET /metrics``. Chat messages are segmented by the same builder as training
and prefilled with the MAS mask the adapter was trained with; requests share the model through
continuous batching, and prompt prefixes that end at a segment boundary (a system prompt, an
earlier conversation) are reused exactly across requests. docs/serving.md has the details.
"""

from __future__ import annotations

import logging
import sys

import mas

if getattr(mas, "__file__", None) is None:  # a plain folder named "mas" in the working directory
    sys.exit(f"a folder named 'mas' in {list(mas.__path__)} shadows the installed mas package; run from another directory")

from omegaconf import DictConfig

from mas.config import parse, run_reporting_user_errors, to_options
from mas.serving import ServeOptions, build_server, run_server

RECIPE = "mas_serve"


def run(cfg: DictConfig) -> None:
    options = to_options(cfg, ServeOptions, RECIPE)
    level = getattr(logging, options.log_level.upper())
    logging.getLogger().setLevel(level)
    logging.getLogger("mas_serve").setLevel(level)
    state = build_server(options)
    run_server(state, options)


@parse(RECIPE, ServeOptions)
def recipe_main(cfg: DictConfig) -> int:
    return run_reporting_user_errors(RECIPE, run, cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
