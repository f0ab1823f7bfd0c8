"""Keys every inference recipe (``mas_generate``, ``mas_eval``, ``mas_serve``) shares, once; the
one mapping from them to the engine's settings (:func:`generation_settings`); and the one policy
for an adapter's recorded prompt settings against the config's (:func:`prompt_settings`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, List, Literal, Optional, TypeVar

from mas.attention import AttentionBackend
from mas.config import component, option
from mas.generation.settings import CompileMode, GenerationSettings
from mas.masks import AttentionMode
from mas.segments import PromptFormat
from mas.model_weights import check_lora_values

__all__ = ["GenerateOptions", "InferenceOptions", "PROMPT_DEFAULTS", "PromptSettings", "generation_settings", "prompt_settings", "with_prompt_settings"]


@dataclass(kw_only=True)
class InferenceOptions:
    """Loading a model and prompting it as it was trained."""

    model: Any = component("the model builder (a lora_* builder to load an adapter)")
    checkpointer: Any = component("base (or merged) weights: a torchtune FullModelHFCheckpointer")
    tokenizer: Any = component("the tokenizer builder")
    adapter_checkpoint: Optional[str] = option(None, "a mas_lora_finetune checkpoint folder or run folder (null: base model)")
    allow_other_base: bool = option(False, "run an adapter on a base other than the one its run.json records (a warning instead of the refusal)")
    attention: Optional[AttentionMode] = option(None, "the prompt mask (null: as the adapter was trained, else mas; a value that differs from the adapter's is used, with a warning)")
    attention_backend: AttentionBackend = option("auto", "auto: FlexAttention on CUDA, SDPA otherwise")
    prompt_format: Optional[PromptFormat] = option(None, "plain text or the tokenizer's chat headers (null: as the adapter was trained, else text)")
    merge_system_and_user: Optional[bool] = option(None, "one prompt segment, Appendix C.2 ablation (null: as the adapter was trained, else False)")
    device: str = option("auto", "cpu | cuda | cuda:N | auto")
    dtype: Literal["bf16", "fp32"] = option("bf16", "weights dtype")
    seed: Optional[int] = option(0, "sampling seed (null: nondeterministic)", min=0)
    max_new_tokens: int = option(64, "tokens to generate per prompt (serve: a request's max_tokens when it sets none)", min=1)
    reuse_system_cache: bool = option(True, "the prefix cache: reuse keys and values of prompt prefixes that end at a segment boundary (a shared system prompt is prefilled once; exact under MAS)")
    prefix_cache_max_tokens: int = option(65536, "tokens of prompt prefixes the prefix cache keeps (LRU)", min=1)
    prefix_cache_max_mib: float = option(1024.0, "memory of the prefix cache's keys and values, MiB (LRU)", min=0.0)
    prefill_chunk_tokens: Optional[int] = option(2048, "prompt tokens prefilled per engine step while other sequences decode (bounds their stall; a segment is never split; null: no bound)", min=1)
    compile_decode: bool = option(False, "torch.compile the decode step (forward, sampling and stop checks in one graph per power-of-two width)")
    compile_mode: CompileMode = option("default", "torch.compile mode of the decode step (reduce-overhead: CUDA graphs on GPU)")
    stop_check_every: int = option(8, "decode steps between host reads of the new tokens when nothing streams (1: every step)", min=1)
    max_cache_len: Optional[int] = option(None, "KV cache slots per sequence, prompt + answer (null: generate/eval: longest prompt + max_new_tokens rounded up to 256; serve: the model's max_seq_len)", min=1)

    def check(self) -> None:
        """Rules across keys (subclasses extend them)."""
        check_lora_values(self.model)


@dataclass(kw_only=True)
class GenerateOptions(InferenceOptions):
    """Keys of ``mas_generate``."""

    output_dir: Optional[str] = option(None, "folder a relative output_file is written to (the checkpointer's output_dir too)")
    batch_size: int = option(8, "prompts decoded together (KV-cache rows); more wait for a free row", min=1)
    prompt: Any = option(None, "{system: ..., user: ...} or a string (used when prompts_file is null)")
    prompts_file: Optional[str] = option(None, "JSONL of prompts (README: prompts-file formats)")
    output_file: Optional[str] = option(None, "JSONL of completions (null: print only)")
    temperature: float = option(0.0, "0: greedy", min=0.0)
    top_k: Optional[int] = option(None, "sample from the k most likely tokens (null: all)", min=1)
    top_p: Optional[float] = option(None, "nucleus sampling mass (null: off)", min=0.0, max=1.0)
    stop_tokens: Optional[List[int]] = option(None, "token ids that end generation (null: the tokenizer's)")


@dataclass(frozen=True)
class PromptSettings:
    """How prompts are segmented and masked, and what was noted while deciding it.

    Attributes:
        attention (str), prompt_format (str), merge_system_and_user (bool): what is used.
        mismatches (List[str]): one line per key whose configured value differs from the
            adapter's record (the configured value is used).
        notes (List[str]): other start-up notes.
    """

    attention: AttentionMode
    prompt_format: PromptFormat
    merge_system_and_user: bool
    mismatches: List[str]
    notes: List[str]


#: The prompt keys an adapter records (``adapter_config.json`` ``"mas"``) and their values without one.
PROMPT_DEFAULTS: Dict[str, Any] = {"attention": "mas", "prompt_format": "text", "merge_system_and_user": False}


def prompt_settings(recorded: Optional[Dict[str, Any]], opts: InferenceOptions) -> PromptSettings:
    """The one policy of ``mas_generate``, ``mas_eval`` and ``mas_serve``: a key left null takes
    the adapter's recorded value (without an adapter: :data:`PROMPT_DEFAULTS`); a key set in the
    config wins, with a warning when the adapter was trained otherwise (the paper's Table 3
    cross-evaluation sets ``attention`` on purpose).

    Args:
        recorded (Optional[Dict[str, Any]]): the adapter config's ``"mas"`` entry, or None.
        opts (InferenceOptions): the config.
    """
    recorded = recorded or {}
    chosen: Dict[str, Any] = {}
    mismatches: List[str] = []
    for key, default in PROMPT_DEFAULTS.items():
        configured, trained = getattr(opts, key), recorded.get(key)
        chosen[key] = configured if configured is not None else trained if trained is not None else default
        if configured is not None and trained is not None and configured != trained:
            mismatches.append(
                f"{key}={configured} is used as configured, but the adapter was trained with {key}={trained}"
                + (" (the paper's Table 3 cross-evaluation: expect lower accuracy)" if key == "attention" else "")
                + f"; leave {key} unset to use the adapter's"
            )
    notes = []
    if chosen["merge_system_and_user"] and opts.reuse_system_cache:
        notes.append(
            "merge_system_and_user=True: the system prompt and the user turn are one segment, so no prefix before the end "
            "of a user turn is reusable (the prefix cache only helps later turns of a chat)"
        )
    return PromptSettings(chosen["attention"], chosen["prompt_format"], bool(chosen["merge_system_and_user"]), mismatches, notes)


O = TypeVar("O", bound=InferenceOptions)


def with_prompt_settings(opts: O, settings: PromptSettings) -> O:
    """``opts`` with its prompt keys resolved (every later reader sees the values in use)."""
    return replace(opts, attention=settings.attention, prompt_format=settings.prompt_format, merge_system_and_user=settings.merge_system_and_user)


def generation_settings(opts: InferenceOptions, *, rows: int, **sampling: Any) -> GenerationSettings:
    """The engine settings of an inference recipe: every shared key maps here, once.

    Args:
        opts (InferenceOptions): the recipe's options, prompt keys resolved
            (:func:`with_prompt_settings`).
        rows (int): sequences decoded together (``batch_size`` of generate/eval, ``max_num_seqs``
            of serve).
        **sampling: the recipe's own sampling keys (``temperature``, ``top_k``, ``top_p``,
            ``stop_tokens``).
    """
    if opts.attention is None:
        raise ValueError("resolve the prompt settings first (with_prompt_settings)")
    return GenerationSettings(
        attention=opts.attention,
        attention_backend=opts.attention_backend,
        batch_size=rows,
        max_cache_len=opts.max_cache_len,
        reuse_system_cache=opts.reuse_system_cache,
        prefix_cache_max_tokens=opts.prefix_cache_max_tokens,
        prefix_cache_max_mib=opts.prefix_cache_max_mib,
        prefill_chunk_tokens=opts.prefill_chunk_tokens,
        compile_decode=opts.compile_decode,
        compile_mode=opts.compile_mode,
        stop_check_every=opts.stop_check_every,
        max_new_tokens=opts.max_new_tokens,
        seed=opts.seed,
        **sampling,
    )
