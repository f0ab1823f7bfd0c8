"""Row formats -> torchtune ``Message`` lists with the roles that define MAS segments.

- LLM-Adapters commonsense rows (``instruction``, ``input``, ``output``, ``answer``; the
  Commonsense170K format the paper trains on) and Alpaca rows share the Alpaca template, split
  into a *system* segment (the fixed preamble) and a *user* segment (instruction, input and the
  ``### Response:`` cue); the answer is causal.
- Chat rows: ``messages`` (``role``/``content``) or ShareGPT ``conversations``
  (``from``/``value``).
"""

from __future__ import annotations

from typing import Any, List, Mapping, Optional

from torchtune.data import Message

from mas.data.rows import DataError, optional_text, require_list, require_text

__all__ = [
    "AlpacaRows",
    "ChatRows",
    "CommonsenseRows",
    "PREAMBLE",
    "PREAMBLE_WITH_INPUT",
    "instruction_messages",
]

PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
)
PREAMBLE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
)


def instruction_messages(instruction: str, input: str = "", output: Optional[str] = None) -> List[Message]:
    """The Alpaca / LLM-Adapters template as a system, a user and (if given) an answer message.

    Joined, the three messages read exactly as the LLM-Adapters prompt::

        Below is an instruction that describes a task. Write a response ...\\n\\n   <- system
        ### Instruction:\\n{instruction}\\n\\n### Response:\\n                      <- user
        {output}                                                                  <- assistant
    """
    system = PREAMBLE_WITH_INPUT if input else PREAMBLE
    user = f"### Instruction:\n{instruction}\n\n"
    if input:
        user += f"### Input:\n{input}\n\n"
    user += "### Response:\n"
    messages = [Message("system", system, masked=True), Message("user", user, masked=True)]
    if output is not None:
        messages.append(Message("assistant", output))
    return messages


class AlpacaRows:
    """``instruction``, optional ``input``, ``output`` -> messages."""

    answer_field = "output"

    def __call__(self, row: Mapping[str, Any], where: str, *, with_answer: bool = True) -> List[Message]:
        instruction = require_text(row, "instruction", where)
        input_text = optional_text(row, "input", where)
        output = require_text(row, self.answer_field, where) if with_answer else None
        return instruction_messages(instruction, input_text, output)


class CommonsenseRows(AlpacaRows):
    """LLM-Adapters commonsense rows: Alpaca fields plus the gold ``answer`` label."""

    def __call__(self, row: Mapping[str, Any], where: str, *, with_answer: bool = True) -> List[Message]:
        require_text(row, "answer", where)
        return super().__call__(row, where, with_answer=with_answer)


_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class ChatRows:
    """Chat rows: ``messages`` ([{role, content}]) or ShareGPT ``conversations`` ([{from, value}])."""

    roles = ("system", "user", "assistant", "ipython")

    def __call__(self, row: Mapping[str, Any], where: str, *, with_answer: bool = True) -> List[Message]:
        if "messages" in row:
            turns, role_key, content_key, role_map = require_list(row, "messages", where), "role", "content", None
        elif "conversations" in row:
            turns, role_key, content_key = require_list(row, "conversations", where), "from", "value"
            role_map = _SHAREGPT_ROLES
        else:
            raise DataError(f"{where}: missing field 'messages' (or ShareGPT 'conversations')")
        messages = []
        for i, turn in enumerate(turns):
            turn_where = f"{where}, message {i}"
            if not isinstance(turn, dict):
                raise DataError(f"{turn_where}: expected an object, got {type(turn).__name__}")
            role = require_text(turn, role_key, turn_where)
            role = role_map.get(role, role) if role_map else role
            if role not in self.roles:
                raise DataError(f"{turn_where}: unknown role {role!r}; expected one of {self.roles}")
            content = require_text(turn, content_key, turn_where)
            messages.append(Message(role, content, masked=role != "assistant"))
        if with_answer and messages[-1].role != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's answer for training")
        if not with_answer and messages[-1].role == "assistant":
            messages = messages[:-1]
        if not any(m.role != "assistant" for m in messages):
            raise DataError(f"{where}: no system or user message: nothing to prompt with")
        return messages
