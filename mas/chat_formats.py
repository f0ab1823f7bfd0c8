"""Per-family chat rendering of a single message, for ``SegmentBuilder(prompt_format="chat")``.

torchtune tokenizers render a whole conversation at once (``tokenize_messages``), which hides
where each message starts. MAS needs message boundaries, so each message is rendered on its
own here with the family's header and footer tokens. Families are told apart by tokenizer
type, not by class-name strings.
"""

from __future__ import annotations
from mas.errors import ConfigError

from typing import Any, List

from torchtune.data import Message

__all__ = ["assistant_header", "render_chat_message"]


def _llama3(tokenizer: Any) -> bool:
    from torchtune.models.llama3 import Llama3Tokenizer

    return isinstance(tokenizer, Llama3Tokenizer)


def _qwen2(tokenizer: Any) -> bool:
    from torchtune.models.qwen2 import Qwen2Tokenizer

    return isinstance(tokenizer, Qwen2Tokenizer)


def _text(message: Message) -> str:
    return "".join(item["content"] for item in message.content if item["type"] == "text")


def render_chat_message(
    tokenizer: Any, message: Message, *, index: int, is_last: bool, add_end: bool
) -> List[int]:
    """Token ids of one message in the tokenizer family's chat format.

    Args:
        tokenizer: a torchtune Llama 3 or Qwen2/2.5 tokenizer.
        message (Message): the message.
        index (int): its position in the conversation.
        is_last (bool): whether it is the last message.
        add_end (bool): append the end-of-turn tokens (False for a message to be continued).

    Returns:
        List[int]: the ids, header and footer included.

    Raises:
        ValueError: for a tokenizer family without a chat format here.
    """
    if _llama3(tokenizer):
        return tokenizer.tokenize_message(message, add_start_tokens=True, add_end_tokens=add_end)
    if _qwen2(tokenizer):
        ids = [tokenizer.im_start_id] + tokenizer.encode(f"{message.role}\n", add_bos=False, add_eos=False)
        ids += tokenizer.encode(_text(message), add_bos=False, add_eos=False)
        if add_end:
            ids += [tokenizer.im_end_id] + tokenizer.encode("\n", add_bos=False, add_eos=False)
        return ids
    raise ConfigError(
        f"no chat format for {type(tokenizer).__name__}; use prompt_format: text, which works "
        "with every tokenizer"
    )


def assistant_header(tokenizer: Any) -> List[int]:
    """Tokens that open an assistant turn at generation time."""
    if _llama3(tokenizer):
        return (
            [tokenizer.start_header_id]
            + tokenizer.encode("assistant", add_bos=False, add_eos=False)
            + [tokenizer.end_header_id]
            + tokenizer.encode("\n\n", add_bos=False, add_eos=False)
        )
    if _qwen2(tokenizer):
        return [tokenizer.im_start_id] + tokenizer.encode("assistant\n", add_bos=False, add_eos=False)
    raise ConfigError(f"no chat format for {type(tokenizer).__name__}")
