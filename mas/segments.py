"""The one prompt/segment builder: messages -> ``tokens``, ``labels``, ``segment_ids``.

Training, generation and evaluation all call :class:`SegmentBuilder`, so a model fine-tuned
with MAS is always prompted with the segments it saw in training (a mismatch costs nearly all
accuracy: the paper's Table 3).

Segments come from message roles, never from scanning for special-token ids:

- each ``system`` message and each ``user`` (or ``ipython`` tool-result) message is one
  bidirectional prompt segment, ids 0, 1, 2, ... in order;
- with ``merge_system_and_user=True`` a run of consecutive prompt messages shares one segment
  (the paper's Appendix C.2 ablation);
- ``assistant`` messages, earlier turns included, are :data:`~mas.masks.CAUSAL`.

Leakage guard: inside a bidirectional segment a token sees its successor, so predicting that
successor would be copying. Labels of prompt tokens are therefore always ignored (whatever
``train_on_input`` says); the last prompt token still predicts the first answer token, which it
cannot see. :func:`ignore_leaking_labels` re-checks this for any ``segment_ids`` a user supplies.

Two prompt formats render a message to token ids:

- ``"text"`` (default, as in the paper's base-model experiments): the message content as plain
  text, BOS before the first message and EOS after the final answer;
- ``"chat"``: the tokenizer's own chat headers (Llama 3 ``<|start_header_id|>``...; Qwen2
  ``<|im_start|>``...). Header tokens belong to their message's segment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Literal, Optional, Sequence

import torch
from torch import Tensor
from torchtune.data import Message

from mas.masks import CAUSAL, PAD

__all__ = [
    "IGNORE_INDEX",
    "PROMPT_ROLES",
    "PromptFormat",
    "SegmentBuilder",
    "SegmentedSequence",
    "TooLongError",
    "as_causal",
    "ignore_leaking_labels",
]

#: Label of tokens that do not count in the loss (torchtune's ``CROSS_ENTROPY_IGNORE_IDX``).
IGNORE_INDEX: int = -100
#: Roles whose messages are known at prefill and form bidirectional segments.
PROMPT_ROLES = ("system", "user", "ipython")
ANSWER_ROLES = ("assistant",)

PromptFormat = Literal["text", "chat"]


class TooLongError(ValueError):
    """The answer plus the irreducible prompt does not fit in ``max_seq_len``."""


@dataclass
class SegmentedSequence:
    """One tokenized example.

    Attributes:
        tokens (List[int]): ``[s]`` token ids.
        labels (List[int]): ``[s]`` unshifted targets (``labels[i]`` is the token the model
            should predict at position ``i - 1``), ``IGNORE_INDEX`` where nothing is learned.
        segment_ids (List[int]): ``[s]`` segment ids (``>= 0`` prompt segment, ``CAUSAL``).
        num_truncated (int): prompt tokens removed to fit ``max_seq_len``.
    """

    tokens: List[int]
    labels: List[int]
    segment_ids: List[int]
    num_truncated: int = 0

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def prompt_len(self) -> int:
        """Number of leading tokens that are prompt (segment id >= 0)."""
        n = 0
        while n < len(self.segment_ids) and self.segment_ids[n] >= 0:
            n += 1
        return n


def _message_text(message: Message) -> str:
    return "".join(item["content"] for item in message.content if item["type"] == "text")


def _is_sentencepiece(tokenizer: Any) -> bool:
    from torchtune.modules.transforms.tokenizers import SentencePieceBaseTokenizer

    return isinstance(getattr(tokenizer, "_spm_model", None), SentencePieceBaseTokenizer)


@dataclass
class SegmentBuilder:
    """Turn a list of torchtune ``Message`` into a :class:`SegmentedSequence`.

    Args:
        tokenizer: a torchtune model tokenizer (``encode``, ``bos_id``, ``eos_id``; for the
            chat format also the family's message tokenization).
        prompt_format (str): ``"text"`` or ``"chat"`` (see module docstring).
        merge_system_and_user (bool): consecutive prompt messages share one segment.
        max_seq_len (Optional[int]): longest sequence; longer ones are truncated in the prompt
            (``truncation="prompt"``) or raise :class:`TooLongError` (``truncation="drop"``).
        truncation (str): ``"prompt"``: drop tokens from the start of the user segments, earliest
            first, never the system segment or the answer; ``"drop"``: raise for the caller to
            drop (and count) the row.
    """

    tokenizer: Any
    prompt_format: PromptFormat = "text"
    merge_system_and_user: bool = False
    max_seq_len: Optional[int] = None
    truncation: Literal["prompt", "drop"] = "prompt"
    _sentencepiece: bool = field(init=False, default=False, repr=False)

    def __post_init__(self) -> None:
        if self.prompt_format not in ("text", "chat"):
            raise ValueError(f"prompt_format must be 'text' or 'chat', got {self.prompt_format!r}")
        if self.truncation not in ("prompt", "drop"):
            raise ValueError(f"truncation must be 'prompt' or 'drop', got {self.truncation!r}")
        self._sentencepiece = _is_sentencepiece(self.tokenizer)

    # -- rendering one message ------------------------------------------------------------
    def _encode_text(self, text: str, first: bool) -> List[int]:
        if self._sentencepiece and not first:
            # SentencePiece prefixes every encode() with a space; inside a sequence that would
            # insert spaces at segment boundaries.
            return self.tokenizer.encode(text, add_bos=False, add_eos=False, trim_leading_whitespace=True)
        return self.tokenizer.encode(text, add_bos=False, add_eos=False)

    def _render(self, message: Message, index: int, is_last: bool, add_end: bool) -> List[int]:
        if self.prompt_format == "text":
            return self._encode_text(_message_text(message), first=index == 0)
        from mas.chat_formats import render_chat_message

        return render_chat_message(self.tokenizer, message, index=index, is_last=is_last, add_end=add_end)

    def generation_prompt_tail(self) -> List[int]:
        """Tokens that open the answer at generation time (the chat format's assistant header)."""
        if self.prompt_format == "text":
            return []
        from mas.chat_formats import assistant_header

        return assistant_header(self.tokenizer)

    # -- the builder ----------------------------------------------------------------------
    def __call__(self, messages: Sequence[Message], *, for_generation: bool = False) -> SegmentedSequence:
        """Tokenize ``messages`` into tokens, unshifted labels and segment ids.

        Args:
            messages (Sequence[Message]): system/user/ipython/assistant messages. For training the
                last one is normally the assistant answer.
            for_generation (bool): the sequence is a prompt to continue: no EOS is appended, and
                the chat format's assistant header is appended as causal tokens.

        Returns:
            SegmentedSequence: the example.

        Raises:
            ValueError: for an empty message list or an unknown role.
            TooLongError: if the example cannot fit ``max_seq_len`` (see ``truncation``).
        """
        if not messages:
            raise ValueError("cannot build a sequence from an empty list of messages")
        tokens: List[int] = []
        labels: List[int] = []
        segment_ids: List[int] = []
        next_segment = 0
        previous_was_prompt = False
        bos = getattr(self.tokenizer, "bos_id", None)
        if bos is not None:
            tokens.append(bos)
            labels.append(IGNORE_INDEX)
            segment_ids.append(0 if messages[0].role in PROMPT_ROLES else CAUSAL)
        for index, message in enumerate(messages):
            is_last = index == len(messages) - 1
            # Only an answer that generation will continue is left open (no end-of-turn tokens).
            continue_answer = for_generation and is_last and message.role in ANSWER_ROLES
            ids = self._render(message, index, is_last, add_end=not continue_answer)
            if message.role in PROMPT_ROLES:
                if not (self.merge_system_and_user and previous_was_prompt):
                    segment = next_segment
                    next_segment += 1
                segment_ids.extend([segment] * len(ids))
                labels.extend([IGNORE_INDEX] * len(ids))
                previous_was_prompt = True
            elif message.role in ANSWER_ROLES:
                segment_ids.extend([CAUSAL] * len(ids))
                labels.extend([IGNORE_INDEX] * len(ids) if message.masked else ids)
                previous_was_prompt = False
            else:
                raise ValueError(
                    f"message {index} has unknown role {message.role!r}; expected one of "
                    f"{PROMPT_ROLES + ANSWER_ROLES}"
                )
            tokens.extend(ids)
        if for_generation:
            tail = self.generation_prompt_tail()
            tokens.extend(tail)
            labels.extend([IGNORE_INDEX] * len(tail))
            segment_ids.extend([CAUSAL] * len(tail))
        elif messages[-1].role in ANSWER_ROLES and getattr(self.tokenizer, "eos_id", None) is not None:
            tokens.append(self.tokenizer.eos_id)
            labels.append(IGNORE_INDEX if messages[-1].masked else self.tokenizer.eos_id)
            segment_ids.append(CAUSAL)
        sequence = SegmentedSequence(tokens, labels, segment_ids)
        if self.max_seq_len is not None and len(sequence) > self.max_seq_len:
            sequence = self._fit(sequence)
        return sequence

    def _fit(self, sequence: SegmentedSequence) -> SegmentedSequence:
        """Shorten the user segments (earliest first, from their start) to fit ``max_seq_len``."""
        excess = len(sequence) - self.max_seq_len
        if self.truncation == "drop":
            raise TooLongError(f"{len(sequence)} tokens > max_seq_len {self.max_seq_len}")
        segs = sequence.segment_ids
        system_segment = segs[0] if segs and segs[0] >= 0 else None
        keep = [True] * len(segs)
        # The BOS token (if any) and the first segment (the system prompt when present) stay.
        removable = [
            i
            for i, s in enumerate(segs)
            if s >= 0 and i > 0 and (s != system_segment or self._only_one_prompt_segment(segs))
        ]
        if len(removable) < excess:
            raise TooLongError(
                f"{len(sequence)} tokens > max_seq_len {self.max_seq_len} even after truncating the "
                f"prompt; the answer and system prompt alone need {len(sequence) - len(removable)}"
            )
        # Keep at least one token per segment so no segment silently disappears.
        by_segment: dict[int, List[int]] = {}
        for i in removable:
            by_segment.setdefault(segs[i], []).append(i)
        budget = excess
        for seg_id in sorted(by_segment):
            positions = by_segment[seg_id][:-1]
            take = positions[:budget]
            for i in take:
                keep[i] = False
            budget -= len(take)
            if budget == 0:
                break
        if budget:
            raise TooLongError(
                f"{len(sequence)} tokens > max_seq_len {self.max_seq_len}: the prompt cannot shrink enough"
            )
        return SegmentedSequence(
            tokens=[t for t, k in zip(sequence.tokens, keep) if k],
            labels=[t for t, k in zip(sequence.labels, keep) if k],
            segment_ids=[t for t, k in zip(segs, keep) if k],
            num_truncated=excess,
        )

    @staticmethod
    def _only_one_prompt_segment(segs: List[int]) -> bool:
        return len({s for s in segs if s >= 0}) == 1


def as_causal(segment_ids: Tensor) -> Tensor:
    """The same layout with every prompt segment made causal (the causal baseline's mask).

    Padding and documents are kept, so causal and MAS runs share one attention path.
    """
    return torch.where(segment_ids >= 0, torch.full_like(segment_ids, CAUSAL), segment_ids)


def ignore_leaking_labels(labels: Tensor, segment_ids: Tensor) -> Tensor:
    """Ignore every target that the predicting position can already see.

    Position ``i - 1`` predicts ``labels[:, i]``; it sees token ``i`` iff both lie in the same
    prompt segment. Segments are intervals, so this is the only way a later token is visible.

    Args:
        labels (Tensor): ``[b, s]`` unshifted labels.
        segment_ids (Tensor): ``[b, s]`` segment ids.

    Returns:
        Tensor: ``[b, s]`` labels with leaking targets set to ``IGNORE_INDEX``.
    """
    leaks = torch.zeros_like(labels, dtype=torch.bool)
    leaks[:, 1:] = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] >= 0)
    # A prompt token never has a target of its own either: padding or a segment start that
    # the previous segment cannot see is still prompt, not answer.
    leaks |= segment_ids >= 0
    leaks |= segment_ids == PAD
    return labels.masked_fill(leaks, IGNORE_INDEX)
