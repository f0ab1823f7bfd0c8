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
cannot see. :func:`counts_as_target` is the one definition of "which tokens count": the builder's
labels, :func:`ignore_leaking_labels` (the guard for any ``segment_ids`` a user supplies) and
log-likelihood scoring all use it.

The builder records what it built: its :class:`SegmentSettings`, and on every
:class:`SegmentedSequence` the span and role of each message (:class:`SegmentSpan`), so
generation, scoring and checkpoint metadata read them instead of re-deriving them.

Two prompt formats render a message to token ids:

- ``"text"`` (default, as in the paper's base-model experiments): the message content as plain
  text, BOS before the first message and EOS after the final answer;
- ``"chat"``: the tokenizer's own chat headers (Llama 3 ``<|start_header_id|>``...; Qwen2
  ``<|im_start|>``...). Header tokens belong to their message's segment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Literal, Optional, Sequence, Union, get_args

from torch import Tensor
from torchtune.data import Message

from mas.chat_formats import assistant_header, render_chat_message
from mas.errors import ConfigError
from mas.masks import CAUSAL

__all__ = [
    "IGNORE_INDEX",
    "PROMPT_ROLES",
    "PromptFormat",
    "SegmentBuilder",
    "SegmentSettings",
    "SegmentSpan",
    "SegmentedSequence",
    "TooLongError",
    "Truncation",
    "counts_as_target",
    "ignore_leaking_labels",
]

#: Label of tokens that do not count in the loss (torchtune's ``CROSS_ENTROPY_IGNORE_IDX``).
IGNORE_INDEX: int = -100
#: Roles whose messages are known at prefill and form bidirectional segments.
PROMPT_ROLES = ("system", "user", "ipython")
ANSWER_ROLES = ("assistant",)

PromptFormat = Literal["text", "chat"]
Truncation = Literal["prompt", "drop"]

def counts_as_target(segment_ids: Union[int, Tensor]) -> Union[bool, Tensor]:
    """Whether a token may count as a target (in the loss, or in a log-likelihood score).

    Only causal tokens (answers) count. A prompt token is an input: inside its bidirectional
    segment its predecessor already sees it (predicting it would be copying), and a segment's
    first token is not an answer either. Padding is nothing. The builder's labels, the leakage
    guard and log-likelihood scoring all ask this function.

    Args:
        segment_ids (int or Tensor): one segment id, or ``[b, s]`` segment ids.

    Returns:
        bool, or bool Tensor of the same shape.
    """
    return segment_ids == CAUSAL


class TooLongError(ValueError):
    """The answer plus the irreducible prompt does not fit in ``max_seq_len``."""


@dataclass(frozen=True)
class SegmentSettings:
    """How :class:`SegmentBuilder` segments and fits a conversation; recorded in checkpoints.

    Attributes:
        prompt_format (PromptFormat): ``"text"`` (message content as plain text, the paper's
            setting) or ``"chat"`` (the tokenizer's chat headers).
        merge_system_and_user (bool): consecutive prompt messages share one segment (the paper's
            Appendix C.2 ablation).
        max_seq_len (Optional[int]): longest sequence; None: no limit.
        truncation (Truncation): over-long sequences: ``"prompt"`` drops tokens from the start
            of the user segments, earliest first, never the system segment or the answer;
            ``"drop"`` raises :class:`TooLongError` for the caller to drop (and count) the row.

    Raises:
        ConfigError: for an unknown prompt format or truncation mode.
    """

    prompt_format: PromptFormat = "text"
    merge_system_and_user: bool = False
    max_seq_len: Optional[int] = None
    truncation: Truncation = "prompt"

    def __post_init__(self) -> None:
        if self.prompt_format not in get_args(PromptFormat):
            raise ConfigError(f"prompt_format must be 'text' or 'chat', got {self.prompt_format!r}")
        if self.truncation not in get_args(Truncation):
            raise ConfigError(f"truncation must be 'prompt' or 'drop', got {self.truncation!r}")


@dataclass(frozen=True)
class SegmentSpan:
    """Tokens ``[start, end)`` of one message, as the builder laid it out.

    Merged prompt messages (``merge_system_and_user``) are separate spans with the same
    ``segment_id``. The BOS token belongs to the first span, the EOS token to the last, and the
    chat format's generation header (``for_generation``) is an ``"assistant"`` span.

    Attributes:
        segment_id (int): the segment id of every token in the span (``>= 0`` or ``CAUSAL``).
        role (Optional[str]): the message role (``"system"``, ``"user"``, ``"ipython"``,
            ``"assistant"``); None when not recorded (a sequence built by hand).
        start (int): first token.
        end (int): one past the last token.
    """

    segment_id: int
    role: Optional[str]
    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start


def _spans_from_segment_ids(segment_ids: Sequence[int]) -> List[SegmentSpan]:
    """Runs of equal ids, roles unknown: the spans of a sequence built without the builder."""
    spans: List[SegmentSpan] = []
    start = 0
    for i in range(1, len(segment_ids) + 1):
        if i == len(segment_ids) or segment_ids[i] != segment_ids[start]:
            spans.append(SegmentSpan(segment_ids[start], None, start, i))
            start = i
    return spans


@dataclass
class SegmentedSequence:
    """One tokenized example.

    Attributes:
        tokens (List[int]): ``[s]`` token ids.
        labels (List[int]): ``[s]`` unshifted targets (``labels[i]`` is the token the model
            should predict at position ``i - 1``), ``IGNORE_INDEX`` where nothing is learned.
        segment_ids (List[int]): ``[s]`` segment ids (``>= 0`` prompt segment, ``CAUSAL``).
        num_truncated (int): prompt tokens removed to fit ``max_seq_len``.
        spans (List[SegmentSpan]): one span per message, in order, covering ``[0, s)``. The
            builder records them; for a sequence built by hand (None) they are the runs of equal
            segment ids, with unknown roles.
    """

    tokens: List[int]
    labels: List[int]
    segment_ids: List[int]
    num_truncated: int = 0
    spans: Optional[List[SegmentSpan]] = None

    def __post_init__(self) -> None:
        if self.spans is None:
            self.spans = _spans_from_segment_ids(self.segment_ids)

    def __len__(self) -> int:
        return len(self.tokens)

    def head(self, n: int) -> "SegmentedSequence":
        """The first ``n`` tokens, with the spans cut at ``n`` (spans past ``n`` dropped)."""
        spans = [SegmentSpan(sp.segment_id, sp.role, sp.start, min(sp.end, n)) for sp in self.spans if sp.start < n]
        return SegmentedSequence(
            self.tokens[:n], self.labels[:n], self.segment_ids[:n], self.num_truncated, spans
        )

    @property
    def prompt_len(self) -> int:
        """Number of leading tokens that are prompt (segment id >= 0)."""
        n = 0
        for span in self.spans:
            if span.segment_id < 0:
                break
            n = span.end
        return n


def _message_text(message: Message) -> str:
    return "".join(item["content"] for item in message.content if item["type"] == "text")


def _is_sentencepiece(tokenizer: Any) -> bool:
    from torchtune.modules.transforms.tokenizers import SentencePieceBaseTokenizer

    return isinstance(getattr(tokenizer, "_spm_model", None), SentencePieceBaseTokenizer)


class SegmentBuilder:
    """Turn a list of torchtune ``Message`` into a :class:`SegmentedSequence`.

    Args:
        tokenizer: a torchtune model tokenizer (``encode``, ``bos_id``, ``eos_id``; for the
            chat format also the family's message tokenization).
        prompt_format (str): ``"text"`` or ``"chat"`` (see :class:`SegmentSettings`).
        merge_system_and_user (bool): consecutive prompt messages share one segment.
        max_seq_len (Optional[int]): longest sequence; longer ones are truncated in the prompt
            (``truncation="prompt"``) or raise :class:`TooLongError` (``truncation="drop"``).
        truncation (str): see :class:`SegmentSettings`.

    Attributes:
        settings (SegmentSettings): the four settings above, as one record (written to
            checkpoints, compared at inference).
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_format: PromptFormat = SegmentSettings.prompt_format,
        merge_system_and_user: bool = SegmentSettings.merge_system_and_user,
        max_seq_len: Optional[int] = SegmentSettings.max_seq_len,
        truncation: Truncation = SegmentSettings.truncation,
    ) -> None:
        self.tokenizer = tokenizer
        self.settings = SegmentSettings(prompt_format, merge_system_and_user, max_seq_len, truncation)
        self._sentencepiece = _is_sentencepiece(tokenizer)

    @classmethod
    def from_settings(cls, tokenizer: Any, settings: SegmentSettings) -> "SegmentBuilder":
        """A builder for ``tokenizer`` with ``settings`` (e.g. read back from a checkpoint)."""
        return cls(tokenizer, settings.prompt_format, settings.merge_system_and_user, settings.max_seq_len, settings.truncation)

    @property
    def prompt_format(self) -> PromptFormat:
        return self.settings.prompt_format

    @property
    def merge_system_and_user(self) -> bool:
        return self.settings.merge_system_and_user

    @property
    def max_seq_len(self) -> Optional[int]:
        return self.settings.max_seq_len

    @property
    def truncation(self) -> Truncation:
        return self.settings.truncation

    def __repr__(self) -> str:
        return f"SegmentBuilder({type(self.tokenizer).__name__}, {self.settings})"

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

        return render_chat_message(self.tokenizer, message, index=index, is_last=is_last, add_end=add_end)

    def generation_prompt_tail(self) -> List[int]:
        """Tokens that open the answer at generation time (the chat format's assistant header)."""
        if self.prompt_format == "text":
            return []

        return assistant_header(self.tokenizer)

    # -- the builder ----------------------------------------------------------------------
    def __call__(self, messages: Sequence[Message], *, for_generation: bool = False) -> SegmentedSequence:
        """Tokenize ``messages`` into tokens, unshifted labels, segment ids and spans.

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
        spans: List[SegmentSpan] = []

        def append(ids: List[int], segment: int, role: str, learn: bool) -> None:
            # A token is learned iff its message is (not ``masked``) and it can be a target.
            start = len(tokens)
            tokens.extend(ids)
            segment_ids.extend([segment] * len(ids))
            labels.extend(t if learn and counts_as_target(segment) else IGNORE_INDEX for t in ids)
            spans.append(SegmentSpan(segment, role, start, len(tokens)))

        next_segment = 0
        previous_was_prompt = False
        bos = getattr(self.tokenizer, "bos_id", None)
        for index, message in enumerate(messages):
            if message.role not in PROMPT_ROLES + ANSWER_ROLES:
                raise ValueError(
                    f"message {index} has unknown role {message.role!r}; expected one of "
                    f"{PROMPT_ROLES + ANSWER_ROLES}"
                )
            is_last = index == len(messages) - 1
            # Only an answer that generation will continue is left open (no end-of-turn tokens).
            continue_answer = for_generation and is_last and message.role in ANSWER_ROLES
            ids = self._render(message, index, is_last, add_end=not continue_answer)
            if message.role in PROMPT_ROLES:
                if not (self.merge_system_and_user and previous_was_prompt):
                    segment = next_segment
                    next_segment += 1
                previous_was_prompt = True
            else:
                segment = CAUSAL
                previous_was_prompt = False
            if index == 0 and bos is not None:
                # BOS joins the first message's span and segment; nothing predicts it.
                append([bos] + ids, segment, message.role, learn=not message.masked)
                labels[0] = IGNORE_INDEX
            else:
                append(ids, segment, message.role, learn=not message.masked)
        if for_generation:
            tail = self.generation_prompt_tail()
            if tail:
                append(tail, CAUSAL, "assistant", learn=False)
        elif messages[-1].role in ANSWER_ROLES and getattr(self.tokenizer, "eos_id", None) is not None:
            # EOS closes the final answer: it joins that answer's span.
            last = spans[-1]
            tokens.append(self.tokenizer.eos_id)
            segment_ids.append(CAUSAL)
            labels.append(self.tokenizer.eos_id if not messages[-1].masked else IGNORE_INDEX)
            spans[-1] = SegmentSpan(last.segment_id, last.role, last.start, last.end + 1)
        sequence = SegmentedSequence(tokens, labels, segment_ids, spans=spans)
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
            spans=_kept_spans(sequence.spans, keep),
        )

    @staticmethod
    def _only_one_prompt_segment(segs: List[int]) -> bool:
        return len({s for s in segs if s >= 0}) == 1


def _kept_spans(spans: Sequence[SegmentSpan], keep: Sequence[bool]) -> List[SegmentSpan]:
    """The spans after removing the tokens where ``keep`` is False (emptied spans dropped)."""
    kept_before = [0]
    for k in keep:
        kept_before.append(kept_before[-1] + k)
    shifted = [SegmentSpan(sp.segment_id, sp.role, kept_before[sp.start], kept_before[sp.end]) for sp in spans]
    return [sp for sp in shifted if sp.end > sp.start]


def ignore_leaking_labels(labels: Tensor, segment_ids: Tensor) -> Tensor:
    """Ignore every target that the predicting position can already see, and every non-target.

    Position ``i - 1`` predicts ``labels[:, i]``; it sees token ``i`` iff both lie in the same
    prompt segment (segments are intervals, so this is the only way a later token is visible).
    A prompt token never has a target of its own either (a segment start that the previous
    segment cannot see is still prompt, not answer), and padding has none: the targets left are
    exactly those :func:`counts_as_target` allows.

    Args:
        labels (Tensor): ``[b, s]`` unshifted labels.
        segment_ids (Tensor): ``[b, s]`` segment ids.

    Returns:
        Tensor: ``[b, s]`` labels with leaking and non-target positions set to ``IGNORE_INDEX``.
    """
    return labels.masked_fill(~counts_as_target(segment_ids), IGNORE_INDEX)
