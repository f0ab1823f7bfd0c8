"""Attention maps of one prompt: a causal-trained model under causal attention beside a MAS-trained
model under MAS attention (the paper's Fig. 4), under the two masks themselves (Fig. 1).

The prompt is segmented by the shared builder (:class:`mas.SegmentBuilder`, as in training), run
once through each model with the dense mask of its attention, and the attention probabilities
``softmax(q k^T / sqrt(d))`` over the allowed keys of the chosen layers are recorded by
:class:`AttentionRecorder`, which wraps those layers' ``_attention_call`` without changing their
output (it checks ``probabilities @ v`` against the output it passes on). Segment boundaries are
drawn on every panel; the mask panels are ``tools/draw_mask.py``'s.

Usage::

    python tools/attention_maps.py                                   # base tiny model, both masks
    python tools/attention_maps.py --causal-adapter /tmp/mas_runs/tiny_causal \\
        --mas-adapter /tmp/mas_runs/tiny_mas --layers 0 -1 --heads mean --out fig4.png
    python tools/attention_maps.py --config llama3_2_1b_generate.yaml --user "Is ice cold?" \\
        --override checkpointer.checkpoint_dir=/models/Llama-3.2-1B

Rows: the two masks, then one row per (layer, head) of ``--layers`` x ``--heads`` (a head index
or ``mean``, the mean over heads). The PNG is ``2 * 6.0`` by ``rows * 5.4`` inches at ``--dpi``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import PowerNorm  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.nn.attention.flex_attention import BlockMask  # noqa: E402
from torchtune.data import Message  # noqa: E402

from mas import CAUSAL, SegmentBuilder, dense_mas_mask  # noqa: E402
from mas.attention import block_mask_to_dense  # noqa: E402
from mas.masks import as_causal  # noqa: E402
from mas.testing.drawing import draw_mask_panel  # noqa: E402

#: In the working directory, never a tracked file of the repository unless named with --out.
DEFAULT_OUT = Path("attention_maps.png")
#: Inches per panel; the PNG is (2 * width, rows * height) * dpi pixels.
PANEL_SIZE = (6.0, 5.4)


def attention_probabilities(q: Tensor, k: Tensor, mask, is_causal: bool) -> Tensor:
    """``softmax(q k^T / sqrt(d))`` over the keys each query may attend (SDPA's default scale).

    Args:
        q (Tensor): ``[b, n_h, s_q, h_d]``.
        k (Tensor): ``[b, n_h, s_kv, h_d]`` (GQA heads already expanded, as torchtune passes them).
        mask: dense bool ``[b, s_q, <= s_kv]``, a ``BlockMask``, or None (causal if ``is_causal``).
        is_causal (bool): causal attention when ``mask`` is None.

    Returns:
        Tensor: float32 ``[b, n_h, s_q, kv]`` (``kv`` = the mask's key length); rows that allow no
        key are all zero.
    """
    if mask is None:
        s_q, s_kv = q.shape[-2], k.shape[-2]
        allowed = torch.ones(s_q, s_kv, dtype=torch.bool, device=q.device)
        allowed = allowed.tril(s_kv - s_q) if is_causal else allowed
        allowed = allowed[None, None]
    else:
        allowed = (block_mask_to_dense(mask) if isinstance(mask, BlockMask) else mask)[:, None]
    k = k[:, :, : allowed.shape[-1]]
    scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(q.shape[-1])  # [b, n_h, s_q, kv]
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.nan_to_num(probs, nan=0.0)


class AttentionRecorder:
    """Record the attention probabilities of some layers of a torchtune model during a forward.

    Inside ``with AttentionRecorder(model, layers) as recorder:`` every call of the chosen layers'
    attention stores ``recorder.probs[layer]`` (``[b, n_h, s_q, kv]``) and the largest difference
    between ``probs @ v`` and the layer's real output, ``recorder.max_error[layer]``; outputs are
    returned unchanged, and the original callables come back on exit.

    Args:
        model (nn.Module): a torchtune ``TransformerDecoder`` (``model.layers[i].attn``).
        layers (Sequence[int]): layer indices (negative counts from the end).
    """

    def __init__(self, model: nn.Module, layers: Sequence[int]) -> None:
        count = len(model.layers)
        for layer in layers:
            if not -count <= layer < count:
                raise ValueError(f"layer {layer} does not exist: the model has {count} layers (0..{count - 1})")
        self.model = model
        self.layers = sorted({layer % count for layer in layers})
        self.probs: Dict[int, Tensor] = {}
        self.max_error: Dict[int, float] = {}
        self._originals: Dict[int, object] = {}

    def _wrap(self, index: int, original):
        def recording_call(q, k, v, mask, dropout_p, is_causal):
            out = original(q, k, v, mask=mask, dropout_p=dropout_p, is_causal=is_causal)
            probs = attention_probabilities(q, k, mask, is_causal)
            twin = probs @ v[:, :, : probs.shape[-1]].float()  # [b, n_h, s_q, h_d]
            self.probs[index] = probs.detach().cpu()
            self.max_error[index] = float((twin - out.float()).abs().max())
            return out

        return recording_call

    def __enter__(self) -> "AttentionRecorder":
        for index in self.layers:
            attn = self.model.layers[index].attn
            self._originals[index] = attn._attention_call
            attn._attention_call = self._wrap(index, attn._attention_call)
        return self

    def __exit__(self, *exc) -> None:
        for index, original in self._originals.items():
            self.model.layers[index].attn._attention_call = original
        self._originals.clear()


@torch.inference_mode()
def record(model: nn.Module, tokens: Tensor, segment_ids: Tensor, attention: str, layers: Sequence[int]) -> AttentionRecorder:
    """One forward of ``tokens`` ``[1, s]`` under the dense ``attention`` mask, recording ``layers``."""
    mask = dense_mas_mask(segment_ids if attention == "mas" else as_causal(segment_ids))  # [1, s, s]
    with AttentionRecorder(model, layers) as recorder:
        model(tokens, mask=mask)
    return recorder


def _boundaries(segment_ids: List[int]) -> List[int]:
    return [i for i in range(1, len(segment_ids)) if segment_ids[i] != segment_ids[i - 1]]


def _heatmap(ax, probs: np.ndarray, segment_ids: List[int], labels: Optional[List[str]], title: str) -> None:
    """One ``[s, s]`` map (rows queries, columns keys), segment boundaries as lines."""
    image = ax.imshow(probs, cmap="magma", norm=PowerNorm(gamma=0.4, vmin=0.0, vmax=max(float(probs.max()), 1e-6)), interpolation="nearest")
    for boundary in _boundaries(segment_ids):
        ax.axhline(boundary - 0.5, color="cyan", linewidth=1.0)
        ax.axvline(boundary - 0.5, color="cyan", linewidth=1.0)
    if labels is not None:
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=5)
        ax.set_yticks(range(len(labels)), labels, fontsize=5)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    ax.set_title(title, fontsize=9)
    plt.colorbar(image, ax=ax, fraction=0.046, pad=0.02)


def _token_labels(tokenizer, tokens: List[int]) -> Optional[List[str]]:
    if len(tokens) > 64:
        return None  # too many to read; positions only
    named = {getattr(tokenizer, "bos_id", None): "<bos>", getattr(tokenizer, "eos_id", None): "<eos>"}
    labels = []
    for t in tokens:
        text = named.get(t) or tokenizer.decode([t]).replace("\n", "\\n")
        labels.append(text if text.strip() else (repr(text) if text else f"<{t}>"))
    return labels


def draw(maps: Sequence[Tuple[str, Dict[int, Tensor]]], segment_ids: List[int], kinds: List[int], heads, labels, out: Path, dpi: int = 80) -> int:
    """Masks in the first row, then for each (layer, head) the two models' maps; returns the row count.

    Args:
        maps: two ``(title, {layer: probs [1, n_h, s, s]})``: the causal panel, then the MAS panel.
        segment_ids (List[int]): ``[s]`` segment ids of the prompt.
        kinds (List[int]): ``[s]`` 0 system, 1 user, 2 answer (for the mask panels).
        heads: head indices and/or ``"mean"`` (the mean over heads), one row each per layer.
    """
    layers = sorted(maps[0][1])
    rows = [(layer, head) for layer in layers for head in heads]
    fig, axes = plt.subplots(1 + len(rows), 2, figsize=(2 * PANEL_SIZE[0], (1 + len(rows)) * PANEL_SIZE[1]), squeeze=False)
    ids = torch.tensor([segment_ids])
    causal_mask, mas_mask = (dense_mas_mask(s)[0].numpy() for s in (as_causal(ids), ids))
    draw_mask_panel(axes[0, 0], causal_mask, kinds, "Causal mask", np.zeros_like(causal_mask))
    draw_mask_panel(axes[0, 1], mas_mask, kinds, "MAS mask", mas_mask & ~causal_mask)
    for row, (layer, head) in enumerate(rows, start=1):
        for column, (title, probs) in enumerate(maps):
            p = probs[layer][0]  # [n_h, s, s]
            picked = p.mean(0) if head == "mean" else p[head]
            _heatmap(axes[row, column], picked.numpy(), segment_ids, labels, f"{title}\nlayer {layer}, head {head}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return 1 + len(rows)


def _panel_title(attention: str, loaded) -> str:
    trained = loaded.trained_attention
    source = f"{trained}-trained adapter {loaded.adapter_path.name}" if loaded.adapter_path else "base model"
    return f"{source}, {attention} attention"


def main(argv: Optional[Sequence[str]] = None) -> int:
    from mas.config import instantiate, load_config, to_options
    from mas.generation.loading import load_inference_model
    from mas.generation.options import GenerateOptions, prompt_settings, with_prompt_settings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny_generate", help="a mas_generate-style config (tiny_generate)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    parser.add_argument("--causal-adapter", help="adapter of a causal fine-tune (default: the base model)")
    parser.add_argument("--mas-adapter", help="adapter of a MAS fine-tune (default: the base model)")
    parser.add_argument("--layers", nargs="+", type=int, default=[0, -1], help="layer indices, negative from the end (0 -1)")
    parser.add_argument("--heads", nargs="+", default=["mean"], help="head indices, or 'mean' over heads (mean)")
    parser.add_argument("--system", help="system prompt (default: the config's prompt.system)")
    parser.add_argument("--user", help="user prompt (default: the config's prompt.user)")
    parser.add_argument("--answer", help="an answer to append as causal tokens (default: none)")
    parser.add_argument("--dpi", type=int, default=80, help="resolution (80)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"PNG to write ({DEFAULT_OUT})")
    args = parser.parse_args(argv)
    try:
        heads = [h if h == "mean" else int(h) for h in args.heads]
    except ValueError:
        parser.error(f"--heads takes head indices or 'mean', got {args.heads}")

    options = to_options(load_config(args.config, args.override), GenerateOptions, "mas_generate")
    # One prompt for both panels: the config's prompt keys, else the defaults (the two adapters
    # differ only in their attention mode, which each panel sets).
    options = with_prompt_settings(options, prompt_settings(None, options))
    prompt = options.prompt if isinstance(options.prompt, dict) else {"user": options.prompt} if options.prompt else {}
    system = args.system if args.system is not None else prompt.get("system")
    user = args.user if args.user is not None else prompt.get("user")
    if not user:
        parser.error("no user prompt: pass --user or use a config with prompt.user")
    messages = ([Message("system", system, masked=True)] if system else []) + [Message("user", user, masked=True)]
    if args.answer:
        messages.append(Message("assistant", args.answer))
    tokenizer = instantiate(options.tokenizer)
    builder = SegmentBuilder(tokenizer, prompt_format=options.prompt_format, merge_system_and_user=options.merge_system_and_user)
    sequence = builder(messages, for_generation=not args.answer)
    if args.answer and sequence.tokens[-1] == getattr(tokenizer, "eos_id", None):
        sequence.tokens, sequence.segment_ids = sequence.tokens[:-1], sequence.segment_ids[:-1]
    tokens, segment_ids = torch.tensor([sequence.tokens]), torch.tensor([sequence.segment_ids])
    first_is_system = messages[0].role == "system"
    kinds = [2 if s == CAUSAL else (0 if s == 0 and first_is_system else 1) for s in sequence.segment_ids]

    maps = []
    for attention, adapter in (("causal", args.causal_adapter), ("mas", args.mas_adapter)):
        loaded = load_inference_model(options.model, options.checkpointer, adapter_checkpoint=adapter, device=torch.device("cpu"), dtype=torch.float32)
        if loaded.trained_attention not in (None, attention):
            print(f"note: the {attention} panel's adapter was trained with {loaded.trained_attention} attention")
        recorder = record(loaded.model, tokens, segment_ids, attention, args.layers)
        num_heads = recorder.probs[recorder.layers[0]].shape[1]
        if any(h != "mean" and not 0 <= h < num_heads for h in heads):
            parser.error(f"--heads {args.heads}: the model has {num_heads} heads (0..{num_heads - 1})")
        worst = max(recorder.max_error.values())
        if worst > 1e-3:
            raise RuntimeError(f"recorded probabilities do not reproduce the attention output (max error {worst:.2e})")
        maps.append((_panel_title(attention, loaded), recorder.probs))
        del loaded
    rows = draw(maps, sequence.segment_ids, kinds, heads, _token_labels(tokenizer, sequence.tokens), args.out, dpi=args.dpi)
    print(f"wrote {args.out} ({rows} rows of panels, {len(sequence.tokens)} tokens; capture check max error {worst:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
