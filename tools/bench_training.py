"""Benchmark the fine-tuning recipe's own step on real rows, beside torchtune's own recipe.

Every variant is a real recipe object, set up from a config, timed on its own training step:

- ``mas_lora_finetune`` (this project): ``MASLoRAFinetuneRecipe(cfg).setup()``, then
  ``recipe._optimizer_step(batches)`` on the recipe's own data loader (its collation, padding
  and packing) - not a copy of the step. Variants: ``attention: causal`` and ``attention: mas``
  on batches of 8 rows (padded to a multiple of 16, the tiny config's setting, and of 128, the
  default of the paper configs) and packed (``configs/overlays/packed.yaml``: whole examples in
  fixed-length packs with the document mask).
- ``torchtune lora_finetune_single_device`` (the anchor): torchtune's own recipe class, from
  the file torchtune installs, on the same tiny model, weights, tokenizer, rows (converted to its
  ``instruct_dataset``), batch size, optimizer and loss; causal (torchtune cannot do MAS). Its
  ``train()`` loop runs unchanged; a metric logger stamps the time at each step's log call
  (``log_every_n_steps: 1``), so a step is one turn of its loop.

``--model llama3_2_1b`` (for a GPU): the same recipe object on the paper configs
``llama3_2_1b_mas`` / ``llama3_2_1b_causal`` (bf16, LoRA r=32 alpha=64 on q and v) with a
Llama-3.2-1B-shape model of random weights (no weights are downloaded: a seeded init is written
as a Hugging Face checkpoint and loaded by the recipe's checkpointer) and synthetic rows: each
the segment layout of a bundled row drawn at random (its prompt and answer lengths), with
random ids in the 128K vocabulary. Variants: MAS and causal, eager and ``compile=True``, at the
paper's unpacked setting (batch 8, cutoff 256, padded to a multiple of 128), and MAS compiled in
packs of 2048. It adds MAS/causal and compiled/eager ratios, dynamo's recompile count and a
``torch.profiler`` summary of one compiled packed step (top kernels, GPU-busy fraction).
``--layers/--dim/--vocab`` shrink the shape for a CPU check of the whole path (never written).

Data: the bundled Commonsense170K rows (``mas/assets/commonsense/train_sample``, 550 training
rows, ~100-135 tokens each with a 6-9 token answer), in file order. Variants run in turn, round
after round, each round the same first steps of the epoch, so the ratios are fair on a shared
machine. The headline is **real (non-padding) tokens/s**; padded tokens/s, step time, peak
memory (CUDA) and useful FLOP/s (MFU on CUDA) are beside it.

FLOPs: frozen base weights 4N per real token (forward 2N, input gradients 2N), LoRA weights 6N,
attention ``12 * layers * keys * dim`` over the keys a query may see; the LM head is counted
once, also when it is tied to the embedding (``output.weight`` absent). Padding is not useful work.

Usage::

    python tools/bench_training.py                 # CPU, the embedded tiny model
    python tools/bench_training.py --device cuda   # the same on a GPU (bf16)
    python tools/bench_training.py --device cuda --model llama3_2_1b --profile-dir gpu_logs
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes"))  # the top-level recipe modules (not a package)

from mas.assets import COMMONSENSE_TRAIN_SAMPLE  # noqa: E402
from mas.config import load_config  # noqa: E402
from mas.data import pack_sequences, pad_token_id  # noqa: E402
from mas.data.formats import PREAMBLE  # noqa: E402
from mas.masks import PAD, as_causal  # noqa: E402
from mas.segments import IGNORE_INDEX, SegmentedSequence  # noqa: E402
from mas.testing.benchlib import BENCHMARKS_FILE, machine_description, markdown_table, update_section  # noqa: E402
from mas.testing.profiling import ProfileSummary, profile_calls  # noqa: E402

NAME = "bench_training"
TITLE = "LoRA training step on real rows: the recipe's own step, torchtune's recipe, packing (`tools/bench_training.py`)"
#: H100/H200 SXM dense bf16 peak (vendor datasheet).
PEAK_BF16_TFLOPS = 989.0
TRAIN_ROWS = "0:550"


# ----------------------------------------------------------------------------- FLOPs
def matmul_params(model: torch.nn.Module) -> Dict[str, int]:
    """Weights that multiply activations: ``{"frozen": N, "lora": n}``.

    Every 2-D weight except the token embedding (a lookup); the LM head once: its own
    ``output.weight``, or the embedding again when tied (torchtune's ``TiedLinear`` owns no
    parameter). Matching names exactly: ``"output" in name`` would also match ``attn.output_proj``.
    """
    frozen = lora = 0
    names = set()
    for name, p in model.named_parameters():
        names.add(name.removeprefix("_orig_mod."))
        if p.dim() != 2 or name.endswith("tok_embeddings.weight"):
            continue
        if "lora_" in name:
            lora += p.numel()
        else:
            frozen += p.numel()
    head = 0
    if "output.weight" not in names:  # tied: the head is the embedding matrix, used once more
        head = model.tok_embeddings.weight.numel()
        frozen += head
    else:
        head = dict(model.named_parameters())["output.weight"].numel()
    return {"frozen": frozen, "lora": lora, "head": head}


def useful_flops(model: torch.nn.Module, real_tokens: int, keys_per_token: float, head_tokens: Optional[int] = None) -> float:
    """FLOPs of one step's real tokens (frozen 4N + LoRA 6n + masked attention), per the module doc.

    ``head_tokens``: count the LM head at only this many positions (the targets: a position
    without one needs no logits) instead of at every real token.
    """
    params = matmul_params(model)
    attn = model.layers[0].attn
    dim = attn.num_heads * attn.head_dim
    per_token = 4 * params["frozen"] + 6 * params["lora"] + 12 * len(model.layers) * keys_per_token * dim
    if head_tokens is None:
        return real_tokens * per_token
    return real_tokens * (per_token - 4 * params["head"]) + head_tokens * 4 * params["head"]


def keys_per_real_token(batch: Dict[str, torch.Tensor], attention: str) -> float:
    """Mean number of keys a real query may attend to under the batch's mask (no [s, s] tensor).

    A real query at position ``i`` sees every earlier key of its document (causal part) and, in
    a prompt segment, the rest of its segment run. Vectorised over ``[b, s]``; the per-token
    loop :func:`keys_per_real_token_loop` is its slow twin.
    """
    segments = batch["segment_ids"]
    if attention == "causal":
        segments = as_causal(segments)
    documents = batch.get("document_ids")
    if documents is None:
        documents = torch.zeros_like(segments)
    b, s = segments.shape
    positions = torch.arange(s).expand(b, s)  # [b, s]
    new_document = torch.ones((b, s), dtype=torch.bool)
    new_document[:, 1:] = documents[:, 1:] != documents[:, :-1]
    document_start = torch.cummax(torch.where(new_document, positions, 0), dim=1).values  # [b, s]
    new_run = new_document.clone()
    new_run[:, 1:] |= segments[:, 1:] != segments[:, :-1]
    # [b, s]: where the run of equal (segment, document) after position i starts (s: none).
    run_starts = torch.where(new_run, positions, s)
    following = torch.cat([run_starts[:, 1:], torch.full((b, 1), s)], dim=1)
    run_end = torch.flip(torch.cummin(torch.flip(following, [1]), dim=1).values, [1])
    visible = positions - document_start + 1 + torch.where(segments >= 0, run_end - positions - 1, 0)
    real = segments != PAD
    return float(visible[real].sum()) / max(int(real.sum()), 1)


def keys_per_real_token_loop(batch: Dict[str, torch.Tensor], attention: str) -> float:
    """:func:`keys_per_real_token` token by token (the obviously correct twin; O(s * segment))."""
    segments = batch["segment_ids"]
    if attention == "causal":
        segments = as_causal(segments)
    documents = batch.get("document_ids")
    total = real = 0
    for b in range(segments.shape[0]):
        row = segments[b].tolist()
        docs = documents[b].tolist() if documents is not None else [0] * len(row)
        start = 0
        for i, s in enumerate(row):
            if i and docs[i] != docs[i - 1]:
                start = i
            if s == PAD:
                continue
            real += 1
            # causal part: every earlier real key of the document, plus the rest of a prompt segment
            visible = i - start + 1
            if s >= 0:
                j = i + 1
                while j < len(row) and row[j] == s and docs[j] == docs[i]:
                    j += 1
                visible += j - i - 1
            total += visible
    return total / max(real, 1)


# ----------------------------------------------------------------------------- variants
@dataclass
class Variant:
    """One recipe to time: ``step()`` runs one optimizer step, ``steps_per_round`` per round."""

    name: str
    recipe: str
    attention: str
    layout: str
    model: torch.nn.Module
    start_round: Callable[[], None]
    step: Callable[[], None]
    step_times: List[float] = field(default_factory=list)
    real_tokens: List[int] = field(default_factory=list)
    padded_tokens: List[int] = field(default_factory=list)
    examples: List[int] = field(default_factory=list)
    keys: List[float] = field(default_factory=list)
    targets: List[int] = field(default_factory=list)
    peak_gib: Optional[float] = None


class CountingBatches:
    """Wrap a loader's iterator and keep each CPU batch, to count its tokens after the timing.

    ``next()`` only keeps a reference (the step's time holds the recipe's data loading, not the
    benchmark's counting); :meth:`counts` reads the ``k``-th batch of the round afterwards.
    """

    def __init__(self, batches: Iterator[Dict[str, torch.Tensor]], attention: str) -> None:
        self.batches, self.attention = batches, attention
        self.seen: List[Any] = []

    def __iter__(self) -> "CountingBatches":
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        batch = next(self.batches)
        self.seen.append(batch)
        return batch

    def counts(self, k: int) -> Dict[str, Any]:
        """Real and padded tokens, examples and mean visible keys of the ``k``-th batch."""
        batch = self.seen[k]
        # The recipe's loader yields dicts of collated tensors (or its prepared host batches).
        fields = batch if isinstance(batch, dict) else vars(batch)
        fields = {k: fields.get(k) for k in ("tokens", "segment_ids", "document_ids")}
        documents = fields["document_ids"]
        real = fields["segment_ids"] != PAD
        examples = int(real[:, 0].sum()) if documents is None else sum(
            len(set(documents[b][real[b]].tolist())) for b in range(real.shape[0])
        )
        return {
            "real": int(real.sum()),
            "padded": fields["tokens"].numel(),
            "examples": examples,
            "keys": keys_per_real_token(fields, self.attention),
            "targets": getattr(batch, "num_targets", None),
        }


def _whole_mask_sdpa() -> Any:
    """While active, CPU masks are attended with one SDPA call over the whole mask (no windows)."""
    import functools
    from unittest import mock

    import mas.attention
    from mas.windowed_sdpa import windowed_mas_mask

    return mock.patch.object(mas.attention, "windowed_mas_mask", functools.partial(windowed_mas_mask, max_work=0.0))


def our_recipe(
    name: str, attention: str, overrides: List[str], out: Path, args: argparse.Namespace, *, whole_mask: bool = False
) -> Variant:
    """This project's recipe object on the tiny config, set up and ready to step.

    ``whole_mask``: the slow twin of the CPU attention, one SDPA call over the whole dense mask
    instead of one per query tile over its key window (:mod:`mas.windowed_sdpa`).
    """
    import mas_lora_finetune

    run_dir = out / name.replace(" ", "_").replace(",", "")
    cfg = load_config(
        f"tiny_{attention}",
        [
            f"output_dir={run_dir}",
            f"checkpointer.checkpoint_dir={args.base_dir}",
            f"device={args.device}",
            f"dtype={'bf16' if args.device == 'cuda' else 'fp32'}",
            "shuffle=False",
            "progress_bar=False",
            "~val_dataset",
            "val_every_n_steps=None",
            "~metric_logger",
            *overrides,
        ],
    )
    recipe = mas_lora_finetune.MASLoRAFinetuneRecipe(cfg)
    recipe.setup()
    state: Dict[str, Any] = {}

    def start_round() -> None:
        state["batches"] = CountingBatches(recipe._micro_batches(0, 0), attention)

    def step() -> None:
        if whole_mask:
            with _whole_mask_sdpa():
                recipe._optimizer_step(state["batches"])
        else:
            recipe._optimizer_step(state["batches"])

    variant = Variant(name, "mas_lora_finetune", attention, "", recipe.model, start_round, step)
    variant.counter = state  # type: ignore[attr-defined]
    return variant


class StepStamps:
    """A torchtune metric logger that records when each step is logged (nothing is written)."""

    def __init__(self) -> None:
        self.stamps: List[float] = []

    def log_dict(self, payload: Dict[str, Any], step: int) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())

    def log(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_config(self, config: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _torchtune_recipe_class() -> type:
    """torchtune's ``LoRAFinetuneRecipeSingleDevice`` from the file its wheel installs (its
    ``recipes`` package cannot be imported: its ``__init__`` raises)."""
    import importlib.util

    import torchtune

    path = Path(torchtune.__file__).resolve().parents[1] / "recipes" / "lora_finetune_single_device.py"
    spec = importlib.util.spec_from_file_location("torchtune_lora_finetune_single_device", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.LoRAFinetuneRecipeSingleDevice


def torchtune_recipe(out: Path, args: argparse.Namespace, steps_per_round: int, tiny: DictConfig) -> Variant:
    """torchtune's own single-device LoRA recipe on the same model, weights, rows and batch."""
    rows = json.loads(Path(COMMONSENSE_TRAIN_SAMPLE).read_text())[slice(*map(int, TRAIN_ROWS.split(":")))]
    # The same text as this project's template: system preamble, user instruction, answer.
    converted = [
        {"input": f"{PREAMBLE}### Instruction:\n{r['instruction']}\n\n### Response:\n", "output": r["output"]} for r in rows
    ]
    data_file = out / "torchtune_rows.json"
    data_file.write_text(json.dumps(converted))
    cfg = OmegaConf.create(
        {
            "output_dir": str(out / "torchtune"),
            "model": OmegaConf.to_container(tiny.model),
            "tokenizer": {"_component_": "mas.models.tiny_llama3_tokenizer", "max_seq_len": 256},
            "checkpointer": {
                "_component_": "torchtune.training.FullModelHFCheckpointer",
                "checkpoint_dir": str(args.base_dir),
                "checkpoint_files": ["model.safetensors"],
                "model_type": "LLAMA3_2",
                "output_dir": str(out / "torchtune"),
            },
            "resume_from_checkpoint": False,
            "save_adapter_weights_only": True,
            "dataset": {
                "_component_": "torchtune.datasets.instruct_dataset",
                "source": "json",
                "data_files": str(data_file),
                "split": "train",
                "train_on_input": False,
            },
            "seed": 0,
            "shuffle": False,
            "batch_size": args.batch,
            "optimizer": OmegaConf.to_container(tiny.optimizer),
            "lr_scheduler": {"_component_": "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup", "num_warmup_steps": 5},
            "loss": {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss"},
            "epochs": 1,
            "max_steps_per_epoch": steps_per_round,
            "gradient_accumulation_steps": 1,
            "clip_grad_norm": 1.0,
            "compile": False,
            "device": args.device,
            "dtype": "bf16" if args.device == "cuda" else "fp32",
            "enable_activation_checkpointing": False,
            "enable_activation_offloading": False,
            "metric_logger": {"_component_": "torchtune.training.metric_logging.DiskLogger", "log_dir": str(out / "torchtune" / "logs")},
            "log_every_n_steps": 1,
            "log_peak_memory_stats": False,
        }
    )
    recipe = _torchtune_recipe_class()(cfg)
    recipe.setup(cfg)
    stamps = StepStamps()
    recipe._metric_logger = stamps
    dataset = recipe._dataloader.dataset
    pad_id = recipe._tokenizer.pad_id

    def start_round() -> None:
        recipe.epochs_run = 0  # each round replays the first steps of epoch 0, as ours do
        stamps.stamps = [time.perf_counter()]

    def run_round() -> None:
        recipe.train()

    variant = Variant("torchtune lora_finetune_single_device", "torchtune", "causal", "", recipe._model, start_round, run_round)
    variant.torchtune = (stamps, dataset, pad_id)  # type: ignore[attr-defined]
    return variant


# ----------------------------------------------------------------------------- timing
def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers (each storage once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def run_rounds(
    variants: List[Variant], args: argparse.Namespace, device: torch.device, after_warmup: Optional[Callable[[], None]] = None
) -> None:
    """``args.rounds`` rounds; in each, every variant runs ``args.steps`` steps from the epoch's
    start; the first step of a round (iterator start-up) is not timed. ``after_warmup`` is
    called once round 0 (warm-up, compiles) is over."""
    for round_index in range(args.rounds + 1):  # round 0 is warm-up
        if round_index == 1 and after_warmup is not None:
            after_warmup()
        for v in variants:
            v.start_round()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                resident = torch.cuda.memory_allocated(device)
            if hasattr(v, "torchtune"):
                stamps, dataset, pad_id = v.torchtune  # type: ignore[attr-defined]
                v.step()  # its whole loop: args.steps steps, stamped by the logger
                times = [b - a for a, b in zip(stamps.stamps, stamps.stamps[1:])]
                for k in range(1, len(times)):
                    items = [dataset[i] for i in range(k * args.batch, (k + 1) * args.batch)]
                    lengths = [len(it["tokens"]) for it in items]
                    if round_index:
                        v.step_times.append(times[k])
                        v.real_tokens.append(sum(lengths))
                        v.padded_tokens.append(len(items) * max(lengths))
                        v.examples.append(len(items))
                        v.keys.append(sum(n * (n + 1) / 2 for n in lengths) / sum(lengths))  # causal
            else:
                counter = v.counter["batches"]  # type: ignore[attr-defined]
                for k in range(args.steps):
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    begin = time.perf_counter()
                    v.step()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    elapsed = time.perf_counter() - begin
                    if k and round_index:
                        counts = counter.counts(k)
                        v.step_times.append(elapsed)
                        v.real_tokens.append(counts["real"])
                        v.padded_tokens.append(counts["padded"])
                        v.examples.append(counts["examples"])
                        v.keys.append(counts["keys"])
                        v.targets.append(counts["targets"])
            if device.type == "cuda" and round_index:  # not the warm-up: compiling allocates too
                # Every variant's model stays resident: count this one's weights, plus what its
                # steps allocated above the memory held at the start of its turn.
                peak = (torch.cuda.max_memory_allocated(device) - resident + model_bytes(v.model)) / 2**30
                v.peak_gib = max(v.peak_gib or 0.0, peak)


def paired_step_ratio(a: Variant, b: Variant) -> float:
    """Median over paired steps of ``a``'s step time / ``b``'s.

    Both variants ran the same batches in the same order (same round, same step of the epoch), so
    pairing them step by step cancels the batches' different lengths and most of a shared
    machine's load swings, which a ratio of two separate medians does not.
    """
    if len(a.step_times) != len(b.step_times):
        raise ValueError(f"{a.name} and {b.name} timed different numbers of steps")
    return statistics.median(ta / tb for ta, tb in zip(a.step_times, b.step_times))


def report(variants: List[Variant], args: argparse.Namespace, device: torch.device) -> str:
    by_name = {v.name: v for v in variants}
    rows, rates, _ = variant_table(variants, device, {"recipe": lambda v: v.recipe, "attention": lambda v: v.attention})

    def ratio(a: str, b: str) -> str:
        return f"{rates[a] / rates[b]:.2f}" if a in rates and b in rates else "n/a"

    tt, causal, mas = "torchtune lora_finetune_single_device", "causal, rows", "MAS, rows"
    notes = [
        f"- this project's causal step / torchtune's recipe (real tokens/s): {ratio(causal, tt)} (target >= 1)",
        f"- MAS / causal step time on the same batches (median of step-by-step ratios): "
        f"{paired_step_ratio(by_name[mas], by_name[causal]):.3f} (target <= 1.03)",
    ]
    for v in variants:
        if v.name.endswith("one SDPA call"):
            windowed = v.name[: -len(", one SDPA call")]
            notes.append(
                f"- {windowed}: windowed SDPA (one call per example's key window, `mas/windowed_sdpa.py`) / one SDPA call "
                f"over the whole mask, step time: {paired_step_ratio(by_name[windowed], v):.3f}"
            )
            continue
        if v.name.startswith("MAS, packed"):
            notes.append(f"- {v.name} / MAS, rows padded to 128 (the paper configs' unpacked batch): "
                         f"{ratio(v.name, 'MAS, rows padded to 128')} (target >= 1.8); / MAS, rows padded to 16 "
                         f"(the tiny config's own padding): {ratio(v.name, mas)}")
    first = args.packs[0]
    if f"causal, packed {first}" in by_name:
        notes.append(
            f"- packed {first}: MAS / causal step time {paired_step_ratio(by_name[f'MAS, packed {first}'], by_name[f'causal, packed {first}']):.3f}"
        )
    path = "compiled FlexAttention with a BlockMask" if device.type == "cuda" else "SDPA with the dense mask, one call per query tile over its key window (`mas/windowed_sdpa.py`; FlexAttention has no CPU backward)"
    return "\n".join(
        [
            f"### {device.type}",
            "",
            f"Measured {datetime.date.today().isoformat()} with `python tools/bench_training.py --device {device.type} --rounds {args.rounds} --steps {args.steps}"
            + (f" --threads {args.threads}" if args.threads else "") + "`.",
            f"Machine: {machine_description(device)}.",
            f"Model: the embedded tiny Llama 3.2 (`tiny_mas` / `tiny_causal`: 2 layers, 64 dims, vocabulary 1024, tied LM head, "
            f"LoRA r=8 on q and v), its pre-trained weights, {'bf16' if device.type == 'cuda' else 'fp32'}; "
            f"the bundled 550 Commonsense170K training rows in file order; batch {args.batch} rows or the packs of "
            f"`configs/overlays/packed.yaml` (1 pack of 1024 tokens per step, ~8 examples) and of `tiny_mas_throughput` (2 packs of 1024); AdamW, clip 1.0, "
            f"torchtune's `CEWithChunkedOutputLoss` for all. Ours run on {path}. "
            f"{args.rounds} rounds of {args.steps} steps per variant, interleaved, after one warm-up round; the first step of "
            "a round is not timed. A step is one optimizer step: our `recipe._optimizer_step` (data loading, collation, mask, "
            "forward, loss, backward, clip, AdamW) or one turn of torchtune's `train()` loop (the same, plus its per-step "
            "`loss.item()` and progress bar). Rates and step time are medians over the timed steps.",
            "",
            markdown_table(rows),
            "",
            *notes,
            "- real tokens: non-padding tokens of the batch (prompt and answer); torchtune pads a batch to its longest row, "
            "ours to a multiple of `pad_to_multiple_of`. Its chat-format tokenizer adds header tokens, so its rows are a few "
            "tokens longer than ours: compare real tokens/s, not step times.",
        ]
    )


# ----------------------------------------------------------------------------- Llama-3.2-1B shape
#: torchtune's ``llama3_2_1b`` (tied LM head, GQA 32/8 heads of 64 dims, scaled RoPE), built by the
#: tiny model's builders, which take every dimension (the same torchtune component).
LLAMA3_2_1B: Dict[str, int] = dict(
    vocab_size=128_256, num_layers=16, num_heads=32, num_kv_heads=8, embed_dim=2048, intermediate_dim=8192, max_seq_len=131_072
)
#: Real tokens/s of the eager step before issue 12 on an H200 (8 x 256 padded, full logits; the
#: probe of 2026-11-30 in BENCHMARKS.md): the base of the ">= 2x" target.
EAGER_BEFORE_REAL_TOKENS_S = 14_900.0
PACKED_MFU_TARGET = 0.40


def model_dims(args: argparse.Namespace) -> Dict[str, int]:
    """Llama-3.2-1B's dimensions, shrunk by ``--layers`` / ``--dim`` / ``--vocab`` (CPU checks)."""
    dims = dict(LLAMA3_2_1B)
    if args.layers:
        dims["num_layers"] = args.layers
    if args.dim:
        if args.dim % 256:
            raise SystemExit(f"--dim {args.dim}: use a multiple of 256 (64-dim heads, 4 query heads per KV head, as in Llama-3.2-1B)")
        heads = args.dim // 64
        dims.update(embed_dim=args.dim, num_heads=heads, num_kv_heads=heads // 4, intermediate_dim=4 * args.dim)
    if args.vocab:
        dims["vocab_size"] = args.vocab
    return dims


def synthetic_rows(
    examples: List[Any], count: int, vocab_size: int, *, seed: int = 0, pad_id: int = 0, pack_length: Optional[int] = None
) -> List[Dict[str, List[int]]]:
    """Rows shaped like real ones, with random token ids of a larger vocabulary.

    Each row copies the segment layout (system, user and answer lengths; labels on the answer)
    of a real tokenized example drawn at random, and draws its ids uniformly from
    ``[0, vocab_size)``: the bundled tokenizer is the tiny one, the model has Llama 3's vocabulary.

    Args:
        examples (List[SegmentedSequence]): the real tokenized rows (the recipe's dataset).
        count (int): rows to draw.
        vocab_size (int): ids are drawn below it.
        seed (int): generator seed (the same rows for every variant).
        pad_id (int): padding id of packs.
        pack_length (Optional[int]): pack the rows (:func:`mas.data.packing.pack_sequences`,
            as the recipe's ``dataset.packed``) into packs of this many tokens.

    Returns:
        List[Dict[str, List[int]]]: dataset items (``tokens``, ``labels``, ``segment_ids``; packs
        also ``document_ids``, ``input_pos``).
    """
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(examples), (count,), generator=generator).tolist()
    rows = []
    for index in picks:
        example = examples[index]
        tokens = torch.randint(vocab_size, (len(example),), generator=generator).tolist()
        labels = [IGNORE_INDEX if label == IGNORE_INDEX else token for token, label in zip(tokens, example.labels)]
        rows.append(SegmentedSequence(tokens, labels, list(example.segment_ids)))
    if pack_length:
        return pack_sequences(rows, pack_length, pad_id=pad_id)
    return [{"tokens": r.tokens, "labels": r.labels, "segment_ids": r.segment_ids} for r in rows]


@dataclass
class SyntheticSpec:
    """One variant of the 1B-shape run: attention, compile, and rows or packs per step."""

    name: str
    attention: str
    compiled: bool
    layout: str
    overrides: List[str]
    pack_length: Optional[int] = None


def synthetic_recipe(spec: SyntheticSpec, out: Path, args: argparse.Namespace, dims: Dict[str, int]) -> Variant:
    """This project's recipe on the paper config ``llama3_2_1b_<attention>``, set up and ready to
    step: base weights of the model's shape written with a seeded random init and loaded by the
    recipe's checkpointer; its loader then replaced by one over :func:`synthetic_rows` (the
    recipe's own ``_dataloader``: collation, padding, host-side preparation, pinning)."""
    import mas_lora_finetune

    cuda = args.device == "cuda"
    run_dir = out / spec.name.replace(" ", "_").replace(",", "")
    cfg = load_config(
        f"llama3_2_1b_{spec.attention}",
        [
            f"output_dir={run_dir}",
            "model._component_=mas.models.lora_tiny_llama3_2",
            *(f"model.{k}={v}" for k, v in dims.items()),
            "checkpointer._component_=mas.models.tiny_hf_checkpointer",
            "~checkpointer.checkpoint_files",
            "~checkpointer.model_type",
            f"checkpointer.checkpoint_dir={args.base_dir}",
            "checkpointer.pretrain_steps=0",
            *(f"checkpointer.{k}={v}" for k, v in dims.items()),
            "tokenizer._component_=mas.models.tiny_llama3_tokenizer",
            "~tokenizer.path",
            f"dataset.source={COMMONSENSE_TRAIN_SAMPLE}",
            f"dataset.rows='{TRAIN_ROWS}'",
            "~val_dataset",
            "~metric_logger",
            "shuffle=False",
            "progress_bar=False",
            f"device={args.device}",
            f"dtype={'bf16' if cuda else 'fp32'}",
            f"optimizer.fused={cuda}",
            f"compile={spec.compiled}",
            *spec.overrides,
        ],
    )
    recipe = mas_lora_finetune.MASLoRAFinetuneRecipe(cfg)
    recipe.setup()
    batch = recipe.opts.batch_size
    per_pack = (spec.pack_length // 100 + 1) if spec.pack_length else 1  # rows are >= ~100 tokens
    count = (args.steps + 2) * batch * per_pack
    rows = synthetic_rows(
        recipe.dataset.examples, count, dims["vocab_size"], seed=0, pad_id=pad_token_id(recipe.tokenizer), pack_length=spec.pack_length
    )
    recipe.loader, recipe.sampler = recipe._dataloader(rows, shuffle=False)
    state: Dict[str, Any] = {}

    def start_round() -> None:
        state["batches"] = CountingBatches(recipe._micro_batches(0, 0), spec.attention)

    def step() -> None:
        recipe._optimizer_step(state["batches"])

    variant = Variant(spec.name, "mas_lora_finetune", spec.attention, spec.layout, recipe.model, start_round, step)
    variant.counter = state  # type: ignore[attr-defined]
    variant.examples_source = recipe.dataset.examples  # type: ignore[attr-defined]
    return variant


def synthetic_specs(args: argparse.Namespace) -> List[SyntheticSpec]:
    """MAS and causal, eager and compiled, at the paper's unpacked setting; MAS compiled packed."""
    rows = [f"batch_size={args.batch}", "pad_to_multiple_of=128", "tokenizer.max_seq_len=256"]
    layout = f"{args.batch} rows, cutoff 256, padded to 128"
    specs = [
        SyntheticSpec(f"{label}, {'compiled' if compiled else 'eager'}", attention, compiled, layout, rows)
        for compiled in (False, True)
        for attention, label in (("mas", "MAS"), ("causal", "causal"))
    ]
    for setting in args.packs:
        length, packs = (int(x) for x in setting.split("x"))
        overrides = ["dataset.packed=True", f"dataset.pack_length={length}", f"batch_size={packs}", "tokenizer.max_seq_len=256"]
        layout = f"{packs} pack{'s' if packs > 1 else ''} of {length}"
        specs.append(SyntheticSpec(f"MAS, compiled, packed {setting}", "mas", True, layout, overrides, pack_length=length))
    return specs


def variant_table(
    variants: List[Variant], device: torch.device, leading: Dict[str, Callable[[Variant], str]]
) -> tuple[List[Dict[str, str]], Dict[str, float], Dict[str, float]]:
    """Table rows, real tokens/s and useful FLOP/s of each variant (medians over timed steps).

    Medians of per-step rates: robust to the other jobs of a shared machine. ``leading`` names
    the first columns (header -> value of a variant); the batch and the rates follow.
    """
    rows, rates, flops = [], {}, {}
    for v in variants:
        real_rate = statistics.median(r / t for r, t in zip(v.real_tokens, v.step_times))
        padded_rate = statistics.median(p / t for p, t in zip(v.padded_tokens, v.step_times))
        flops[v.name] = statistics.median(useful_flops(v.model, r, k) / t for r, k, t in zip(v.real_tokens, v.keys, v.step_times))
        rates[v.name] = real_rate
        row = {header: value(v) for header, value in leading.items()}
        row.update(
            {
                "batch": v.layout,
                "real tokens/s": f"{real_rate:,.0f}",
                "padded tokens/s": f"{padded_rate:,.0f}",
                "real / padded": f"{sum(v.real_tokens) / sum(v.padded_tokens):.0%}",
                "examples/step": f"{statistics.mean(v.examples):.1f}",
                "step (ms)": f"{statistics.median(v.step_times) * 1e3:.1f}",
            }
        )
        if device.type == "cuda":
            row["peak mem (GiB)"] = f"{v.peak_gib:.2f}"
            row["MFU"] = f"{flops[v.name] / (PEAK_BF16_TFLOPS * 1e12):.1%}"
        else:
            row["useful GFLOP/s"] = f"{flops[v.name] / 1e9:.2f}"
        rows.append(row)
    return rows, rates, flops


def synthetic_report(
    variants: List[Variant], args: argparse.Namespace, device: torch.device, dims: Dict[str, int], compile_stats: Dict[str, Any]
) -> str:
    rows, rates, flops = variant_table(variants, device, {"variant": lambda v: v.name})
    full_shape = dims == LLAMA3_2_1B

    def ratio(a: str, b: str) -> str:
        return f"{rates[a] / rates[b]:.3f}" if a in rates and b in rates else "n/a"

    by_name = {v.name: v for v in variants}

    def step_ratio(a: str, b: str) -> str:
        return f"{paired_step_ratio(by_name[a], by_name[b]):.3f}" if a in by_name and b in by_name else "n/a"

    notes = [
        f"- MAS / causal step time on the same batches (median of step-by-step ratios): eager {step_ratio('MAS, eager', 'causal, eager')}, "
        f"compiled {step_ratio('MAS, compiled', 'causal, compiled')} (target <= 1.03)",
        f"- compiled / eager real tokens/s: MAS {ratio('MAS, compiled', 'MAS, eager')}, causal {ratio('causal, compiled', 'causal, eager')}",
    ]
    if device.type == "cuda" and full_shape:
        notes.append(
            f"- compiled MAS / the eager step before issue 12 ({EAGER_BEFORE_REAL_TOKENS_S:,.0f} real tokens/s, full logits, "
            f"2026-11-30 probe): {rates['MAS, compiled'] / EAGER_BEFORE_REAL_TOKENS_S:.2f}x (target >= 2x)"
        )
    for v in variants:
        if "packed" in v.name:
            line = f"- {v.name} / MAS, compiled (rows) real tokens/s: {ratio(v.name, 'MAS, compiled')}"
            if device.type == "cuda":
                mfu = flops[v.name] / (PEAK_BF16_TFLOPS * 1e12)
                line += f"; MFU {mfu:.1%} (target >= {PACKED_MFU_TARGET:.0%}: {'met' if mfu >= PACKED_MFU_TARGET else 'missed'})"
            notes.append(line)
            if device.type == "cuda":
                strict = statistics.median(
                    useful_flops(v.model, r, k, head_tokens=n) / t for r, k, n, t in zip(v.real_tokens, v.keys, v.targets, v.step_times)
                )
                notes.append(
                    f"  - counting the LM head only at the {statistics.mean(v.targets):.0f} target positions per step (the only "
                    f"logits the recipe computes; `lm_head_on_targets_only`), MFU is {strict / (PEAK_BF16_TFLOPS * 1e12):.1%}"
                )
    notes.append(
        f"- dynamo: {compile_stats['graphs']} graph(s) compiled in all, {compile_stats['new_graphs']} of them after the warm-up "
        f"round (recompiles; target 0), graph breaks {compile_stats['graph_breaks'] or 'none'}"
    )
    examples = variants[0].examples_source  # type: ignore[attr-defined]
    lengths = [len(e) for e in examples]
    answers = [sum(1 for label in e.labels if label != IGNORE_INDEX) for e in examples]
    shape = "Llama-3.2-1B shape" if full_shape else f"Llama-3.2-1B shape SHRUNK for a check ({dims})"
    argv = f"--device {device.type} --model {args.model} --rounds {args.rounds} --steps {args.steps}"
    if not full_shape:
        argv += "".join(f" --{k} {getattr(args, k)}" for k in ("layers", "dim", "vocab") if getattr(args, k))
    return "\n".join(
        [
            f"### {device.type}, {args.model}",
            "",
            f"Measured {datetime.date.today().isoformat()} with `python tools/bench_training.py {argv}`.",
            f"Machine: {machine_description(device)}.",
            f"Model: {shape} ({dims['num_layers']} layers, {dims['embed_dim']} dims, {dims['num_heads']}/{dims['num_kv_heads']} heads, "
            f"vocabulary {dims['vocab_size']:,}, tied LM head), random weights (seeded init written as a Hugging Face checkpoint "
            f"and loaded by the recipe's checkpointer), {'bf16' if device.type == 'cuda' else 'fp32'}; the paper configs "
            f"`llama3_2_1b_mas` / `llama3_2_1b_causal` (LoRA r=32, alpha=64, dropout 0.05 on q and v; AdamW; "
            f"`CEWithChunkedOutputLoss` with the LM head on target rows only), `compile` as the table says "
            f"(per layer + loss; backend {os.environ.get('TORCH_COMPILE_BACKEND', 'inductor')}). "
            f"Rows: synthetic, each the segment layout of one of the bundled {len(examples)} Commonsense170K rows tokenized "
            f"by the bundled tokenizer (mean {statistics.mean(lengths):.0f} tokens, answer {statistics.mean(answers):.1f}), "
            f"drawn at random, with random ids in the model's vocabulary; the same rows for every variant. Unpacked: the "
            f"paper's setting (batch {args.batch}, cutoff 256, `pad_to_multiple_of: 128`); packed: whole rows in fixed packs "
            f"with the document mask. Attention: {'FlexAttention with a BlockMask' if device.type == 'cuda' else 'SDPA with the dense mask'}. "
            f"A step is the recipe's `_optimizer_step` (loader, collation, mask, forward, loss, backward, clip, AdamW); "
            f"{args.rounds} rounds of {args.steps} steps per variant, interleaved, after one warm-up round (compiles); the "
            "first step of a round is not timed; medians over the timed steps. Peak memory: the variant's weights and "
            "buffers plus the most its steps allocated above what was resident at the start of its turn (all variants' "
            "models stay resident). MFU: useful FLOPs (frozen 4N + LoRA 6n per real "
            f"token, the tied LM head counted once, masked attention; padding excluded) / {PEAK_BF16_TFLOPS:.0f} TFLOP/s "
            "(H100/H200 SXM dense bf16).",
            "",
            markdown_table(rows),
            "",
            *notes,
        ]
    )


def profile_variant(v: Variant, device: torch.device, steps: int, trace_path: Optional[Path]) -> ProfileSummary:
    """Profile ``steps`` steps of ``v`` after one untimed step (iterator start-up)."""
    v.start_round()
    v.step()
    return profile_calls(v.step, steps, device, trace_path=trace_path)


def run_synthetic(args: argparse.Namespace, device: torch.device) -> Optional[str]:
    """The 1B-shape run; returns the report (written unless --no-write or shrunk)."""
    from torch._dynamo.utils import counters

    dims = model_dims(args)
    os.environ["TORCH_COMPILE_BACKEND"] = args.compile_backend  # read by torchtune's compile_model / compile_loss
    profile_dir = Path(args.profile_dir) if args.profile_dir else None
    key = f"{device.type}-{args.model}"
    writes = not args.no_write and dims == LLAMA3_2_1B
    if not args.no_write and not writes:
        print("a shrunk shape (--layers/--dim/--vocab) is a check, not a benchmark: BENCHMARKS.md is left as it is")
    with tempfile.TemporaryDirectory(prefix="bench_training_") as tmp:
        counters.clear()
        variants = [synthetic_recipe(spec, Path(tmp), args, dims) for spec in synthetic_specs(args)]
        compile_stats: Dict[str, Any] = {}

        def warmed_up() -> None:
            compile_stats["graphs_after_warmup"] = counters["stats"]["unique_graphs"]

        run_rounds(variants, args, device, after_warmup=warmed_up)
        compile_stats["graphs"] = counters["stats"]["unique_graphs"]
        compile_stats["new_graphs"] = compile_stats["graphs"] - compile_stats.get("graphs_after_warmup", 0)
        compile_stats["graph_breaks"] = dict(counters["graph_break"])
        text = synthetic_report(variants, args, device, dims, compile_stats)
        print(text, flush=True)
        if writes:  # the timings are safe before the profiler runs
            update_section(BENCHMARKS_FILE, NAME, TITLE, key, text)
        if args.profile_steps:
            profiles = []
            by_name = {v.name: v for v in variants}
            medians = {v.name: statistics.median(v.step_times) * 1e3 for v in variants}
            targets = [name for name in by_name if "packed" in name][:1] + ["MAS, compiled"]
            for name in targets:
                slug = name.replace(", ", "_").replace(" ", "_")
                trace = profile_dir / f"bench_training_{args.model}_{slug}.trace.json.gz" if profile_dir else None
                steps = 1 if "packed" in name else args.profile_steps
                summary = profile_variant(by_name[name], device, steps, trace)
                profiles.append(summary.markdown(f"the {name} step ({by_name[name].layout})", "step", measured_ms=medians[name]))
            text = "\n\n".join([text, *profiles])
            print("\n\n".join(profiles), flush=True)
            if profile_dir:
                profile_dir.mkdir(parents=True, exist_ok=True)
                (profile_dir / f"bench_training_{args.model}_profile.md").write_text("\n\n".join(profiles) + "\n")
            if writes:
                update_section(BENCHMARKS_FILE, NAME, TITLE, key, text)
    return text


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--model", default="tiny", choices=["tiny", "llama3_2_1b"],
        help="tiny: the embedded model, beside torchtune's recipe; llama3_2_1b: the paper config's step on synthetic rows",
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="steps per variant per round (the first is not timed)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--packs", nargs="+", default=None,
        help="packed settings LENGTHxPACKS. tiny (default 1024x1 1024x2; the first also runs causal and one SDPA call over "
        "the whole mask): 1024x1 is the packed overlay, 1024x2 tiny_mas_throughput; llama3_2_1b (default 2048x4, llama3_2_1b_mas_throughput): MAS compiled",
    )
    parser.add_argument("--base-dir", default=None, help="the base checkpoint, written on first use (default: per model, under /tmp/mas_runs)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    shape = parser.add_argument_group("llama3_2_1b only")
    shape.add_argument("--layers", type=int, default=None, help="fewer layers (a CPU check of the code path; never written)")
    shape.add_argument("--dim", type=int, default=None, help="a smaller model width, a multiple of 256 (CPU check)")
    shape.add_argument("--vocab", type=int, default=None, help="a smaller vocabulary (CPU check)")
    shape.add_argument("--compile-backend", default="inductor", help="torch.compile backend of compile=True (eager: a fast CPU check)")
    shape.add_argument("--profile-steps", type=int, default=2, help="profile the compiled packed step (1) and this many compiled row steps; 0: none")
    shape.add_argument("--profile-dir", default=None, help="also write the profile summary and Chrome traces here")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    if args.model == "llama3_2_1b":
        args.packs = args.packs or ["2048x4"]
        args.base_dir = args.base_dir or "/tmp/mas_runs/random_llama3_2_1b"
        run_synthetic(args, device)
        return
    args.packs = args.packs or ["1024x1", "1024x2"]
    args.base_dir = args.base_dir or "/tmp/mas_runs/tiny_llama3_2"
    with tempfile.TemporaryDirectory(prefix="bench_training_") as tmp:
        out = Path(tmp)
        rows16 = [f"batch_size={args.batch}", "pad_to_multiple_of=16"]
        specs = [
            ("causal, rows", "causal", rows16, f"{args.batch} rows, padded to 16"),
            ("MAS, rows", "mas", rows16, f"{args.batch} rows, padded to 16"),
            ("MAS, rows padded to 128", "mas", [f"batch_size={args.batch}", "pad_to_multiple_of=128"], f"{args.batch} rows, padded to 128"),
        ]
        for setting in args.packs:
            length, packs = (int(x) for x in setting.split("x"))
            overrides = ["dataset.packed=True", f"dataset.pack_length={length}", f"batch_size={packs}"]
            layout = f"{packs} pack{'s' if packs > 1 else ''} of {length}"
            if setting == args.packs[0]:
                specs.append((f"causal, packed {setting}", "causal", overrides, layout))
            specs.append((f"MAS, packed {setting}", "mas", overrides, layout))
            if setting == args.packs[0] and device.type == "cpu":
                specs.append((f"MAS, packed {setting}, one SDPA call", "mas", overrides, layout + ", one SDPA call over the whole mask"))
        variants = []
        for name, attention, overrides, layout in specs:
            v = our_recipe(name, attention, overrides, out, args, whole_mask=name.endswith("one SDPA call"))
            v.name, v.layout = name, layout
            variants.append(v)
        tiny = load_config("tiny_causal")
        tt = torchtune_recipe(out, args, args.steps, tiny)
        tt.layout = f"{args.batch} rows, padded to the longest"
        variants.insert(0, tt)
        run_rounds(variants, args, device)
        text = report(variants, args, device)
    print(text)
    if not args.no_write:
        update_section(BENCHMARKS_FILE, NAME, TITLE, args.device, text)


if __name__ == "__main__":
    main()
