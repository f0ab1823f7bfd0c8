"""Serving MAS models over an OpenAI-compatible HTTP API (``tune run mas_serve``).

- :class:`Engine`: one thread runs the inference engine (:class:`mas.generation.InferenceEngine`,
  the same one ``mas.generate`` drives) for the HTTP layer: queue, cancellation, events;
- :func:`create_app`: the FastAPI app (``/v1/chat/completions``, ``/v1/completions``,
  ``/v1/models``, ``/health``, ``/metrics``);
- :class:`ServeOptions`: the recipe's keys.
"""

from mas.serving._app import ServedModel, ServerState, create_app
from mas.serving._engine import (
    Engine,
    EngineStoppedError,
    Event,
    PromptTooLongError,
    QueueFullError,
    SamplingParams,
    SequenceHandle,
    TooManySequencesError,
)
from mas.serving._setup import build_server, run_server, server_state
from mas.serving.options import ServeOptions

__all__ = [
    "Engine",
    "EngineStoppedError",
    "Event",
    "PromptTooLongError",
    "QueueFullError",
    "SamplingParams",
    "SequenceHandle",
    "ServeOptions",
    "ServedModel",
    "ServerState",
    "TooManySequencesError",
    "build_server",
    "create_app",
    "run_server",
    "server_state",
]
