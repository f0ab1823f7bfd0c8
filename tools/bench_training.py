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
from mas.data.formats import PREAMBLE  # noqa: E402
from mas.masks import PAD, as_causal  # noqa: E402
from mas.testing.benchlib import BENCHMARKS_FILE, machine_description, markdown_table, update_section  # noqa: E402

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
    if "output.weight" not in names:  # tied: the head is the embedding matrix, used once more
        frozen += model.tok_embeddings.weight.numel()
    return {"frozen": frozen, "lora": lora}


def useful_flops(model: torch.nn.Module, real_tokens: int, keys_per_token: float) -> float:
    """FLOPs of one step's real tokens (frozen 4N + LoRA 6n + masked attention), per the module doc."""
    params = matmul_params(model)
    attn = model.layers[0].attn
    dim = attn.num_heads * attn.head_dim
    per_token = 4 * params["frozen"] + 6 * params["lora"] + 12 * len(model.layers) * keys_per_token * dim
    return real_tokens * per_token


def keys_per_real_token(batch: Dict[str, torch.Tensor], attention: str) -> float:
    """Mean number of keys a real query may attend to under the batch's mask (no [s, s] tensor)."""
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
    peak_gib: Optional[float] = None


class CountingBatches:
    """Wrap a loader's iterator: count real/padded tokens of each CPU batch before the step."""

    def __init__(self, batches: Iterator[Dict[str, torch.Tensor]], attention: str) -> None:
        self.batches, self.attention = batches, attention
        self.last: List[Dict[str, Any]] = []

    def __iter__(self) -> "CountingBatches":
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        batch = next(self.batches)
        # The recipe's loader yields dicts of collated tensors (or its prepared host batches).
        fields = batch if isinstance(batch, dict) else vars(batch)
        fields = {k: fields.get(k) for k in ("tokens", "segment_ids", "document_ids")}
        documents = fields["document_ids"]
        real = fields["segment_ids"] != PAD
        examples = int(real[:, 0].sum()) if documents is None else sum(
            len(set(documents[b][real[b]].tolist())) for b in range(real.shape[0])
        )
        self.last.append(
            {
                "real": int(real.sum()),
                "padded": fields["tokens"].numel(),
                "examples": examples,
                "keys": keys_per_real_token(fields, self.attention),
            }
        )
        return batch


def our_recipe(name: str, attention: str, overrides: List[str], out: Path, args: argparse.Namespace) -> Variant:
    """This project's recipe object on the tiny config, set up and ready to step."""
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
def run_rounds(variants: List[Variant], args: argparse.Namespace, device: torch.device) -> None:
    """``args.rounds`` rounds; in each, every variant runs ``args.steps`` steps from the epoch's
    start; the first step of a round (iterator start-up) is not timed."""
    for round_index in range(args.rounds + 1):  # round 0 is warm-up
        for v in variants:
            v.start_round()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
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
                        counts = counter.last[k]
                        v.step_times.append(elapsed)
                        v.real_tokens.append(counts["real"])
                        v.padded_tokens.append(counts["padded"])
                        v.examples.append(counts["examples"])
                        v.keys.append(counts["keys"])
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device) / 2**30
                v.peak_gib = max(v.peak_gib or 0.0, peak)


def report(variants: List[Variant], args: argparse.Namespace, device: torch.device) -> str:
    by_name = {v.name: v for v in variants}
    rows = []
    rates: Dict[str, float] = {}
    for v in variants:
        # Medians of per-step rates: robust to the other jobs of a shared machine.
        real_rate = statistics.median(r / t for r, t in zip(v.real_tokens, v.step_times))
        padded_rate = statistics.median(p / t for p, t in zip(v.padded_tokens, v.step_times))
        flop_rate = statistics.median(useful_flops(v.model, r, k) / t for r, k, t in zip(v.real_tokens, v.keys, v.step_times))
        real, padded = sum(v.real_tokens), sum(v.padded_tokens)
        rates[v.name] = real_rate
        row = {
            "recipe": v.recipe,
            "attention": v.attention,
            "batch": v.layout,
            "real tokens/s": f"{real_rate:,.0f}",
            "padded tokens/s": f"{padded_rate:,.0f}",
            "real / padded": f"{real / padded:.0%}",
            "examples/step": f"{statistics.mean(v.examples):.1f}",
            "step (ms)": f"{statistics.median(v.step_times) * 1e3:.1f}",
        }
        if device.type == "cuda":
            row["peak mem (GiB)"] = f"{v.peak_gib:.2f}"
            row["MFU"] = f"{flop_rate / (PEAK_BF16_TFLOPS * 1e12):.1%}"
        else:
            row["useful GFLOP/s"] = f"{flop_rate / 1e9:.2f}"
        rows.append(row)

    def ratio(a: str, b: str) -> str:
        return f"{rates[a] / rates[b]:.2f}" if a in rates and b in rates else "n/a"

    tt, causal, mas = "torchtune lora_finetune_single_device", "causal, rows", "MAS, rows"
    notes = [
        f"- this project's causal step / torchtune's recipe (real tokens/s): {ratio(causal, tt)} (target >= 1)",
        f"- MAS / causal step time on the same batches: {rates[causal] / rates[mas]:.3f} (target <= 1.03)",
    ]
    for v in variants:
        if v.name.startswith("MAS, packed"):
            notes.append(f"- {v.name} / MAS, rows padded to 128 (the paper configs' padding): {ratio(v.name, 'MAS, rows padded to 128')}; "
                         f"/ MAS, rows padded to 16: {ratio(v.name, mas)} (target >= 1.8)")
    first = args.packs[0]
    if f"causal, packed {first}" in by_name:
        notes.append(f"- packed {first}: MAS / causal step time {rates[f'causal, packed {first}'] / rates[f'MAS, packed {first}']:.3f}")
    path = "compiled FlexAttention with a BlockMask" if device.type == "cuda" else "SDPA with the dense mask (FlexAttention has no CPU backward)"
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
            f"`configs/overlays/packed.yaml` (1 pack of 1024 tokens per step, ~8 examples); AdamW, clip 1.0, "
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


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="steps per variant per round (the first is not timed)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--packs", nargs="+", default=["1024x1", "256x4"],
        help="packed settings LENGTHxPACKS (the first also runs causal): 1024x1 is the packed overlay, 256x4 tiny_mas_throughput",
    )
    parser.add_argument("--base-dir", default="/tmp/mas_runs/tiny_llama3_2", help="the tiny base checkpoint (written on first use)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
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
        variants = []
        for name, attention, overrides, layout in specs:
            v = our_recipe(name, attention, overrides, out, args)
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
