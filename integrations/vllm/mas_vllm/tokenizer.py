"""vLLM's tokenizer mode ``mas``: the project's torchtune tokenizer behind vLLM's interface.

MAS segments are built by :class:`mas.segments.SegmentBuilder` over the torchtune tokenizer the
model was trained with, so the served prompt has the training ids by construction. vLLM still
needs a tokenizer of its own (detokenizing the answer, stop strings, ``/tokenize``); this one
wraps the same torchtune tokenizer, so the text vLLM returns is the text ``mas.generate``
decodes.

The torchtune tokenizer is chosen from ``config.json``'s ``model_type``, with the files where
the family's Hugging Face folder keeps them (merged checkpoints copy them along):

=========  ============================================  =====================================
family     torchtune builder                             files
=========  ============================================  =====================================
llama      ``torchtune.models.llama3.llama3_tokenizer``  ``original/tokenizer.model``
                                                         (+ ``tokenizer.json`` special tokens)
qwen2      ``torchtune.models.qwen2_5.qwen2_5_tokenizer``  ``vocab.json``, ``merges.txt``
                                                         (+ ``tokenizer.json`` special tokens)
mistral    ``torchtune.models.mistral.mistral_tokenizer``  ``tokenizer.model``
=========  ============================================  =====================================

vLLM's incremental detokenizer works on "token strings"; here a token string is an opaque
stand-in for its id (a private-use character), and :meth:`MasTokenizer.convert_tokens_to_string`
decodes the ids with the torchtune tokenizer, so multi-byte characters split over several ids
come out whole.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

__all__ = ["MasTokenizer", "torchtune_tokenizer_for"]

# Token strings: id i is chr(_BASE + i); planes 15-16 hold 131068 code points, so larger ids
# spill into a two-character form (a marker, then the id's high and low parts).
_BASE = 0xF0000
_LIMIT = 0x10FFFD - _BASE


def _token_string(token_id: int) -> str:
    if token_id < _LIMIT:
        return chr(_BASE + token_id)
    high, low = divmod(token_id, _LIMIT)
    return chr(0x10FFFD) + chr(_BASE + high) + chr(_BASE + low)


def _ids_of(tokens: Sequence[str]) -> List[int]:
    ids: List[int] = []
    for token in tokens:
        if token.startswith(chr(0x10FFFD)) and len(token) == 3:
            ids.append((ord(token[1]) - _BASE) * _LIMIT + ord(token[2]) - _BASE)
        elif len(token) == 1 and ord(token) >= _BASE:
            ids.append(ord(token) - _BASE)
    return ids


def torchtune_tokenizer_for(model_dir: Union[str, Path]) -> Any:
    """The torchtune tokenizer of the Hugging Face model folder ``model_dir``.

    Raises:
        ValueError: no ``config.json``, a family without a builder here, or a missing file.
    """
    folder = Path(model_dir)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise ValueError(f"mas tokenizer: no config.json in {folder} (serve a local Hugging Face model folder)")
    model_type = json.loads(config_path.read_text()).get("model_type")
    special = folder / "tokenizer.json"
    special_path = str(special) if special.exists() else None

    def need(name: str) -> str:
        if not (folder / name).exists():
            raise ValueError(f"mas tokenizer: {model_type} model folder {folder} lacks {name}")
        return str(folder / name)

    if model_type == "llama":
        from torchtune.models.llama3 import llama3_tokenizer

        return llama3_tokenizer(need("original/tokenizer.model"), special_tokens_path=special_path)
    if model_type == "qwen2":
        from torchtune.models.qwen2_5 import qwen2_5_tokenizer

        return qwen2_5_tokenizer(need("vocab.json"), need("merges.txt"), special_tokens_path=special_path)
    if model_type == "mistral":
        from torchtune.models.mistral import mistral_tokenizer

        return mistral_tokenizer(need("tokenizer.model"), prompt_template=None)
    raise ValueError(f"mas tokenizer: model_type {model_type!r} is not one of the project's families (llama, qwen2, mistral)")


def _special_ids(tokenizer: Any) -> Dict[str, int]:
    special = getattr(tokenizer, "special_tokens", None)
    if isinstance(special, dict):
        return dict(special)
    out = {}
    for name in ("bos_id", "eos_id", "pad_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int) and value >= 0:
            out[f"<{name}>"] = value
    return out


class MasTokenizer:
    """vLLM's ``TokenizerLike`` over a torchtune tokenizer (see the module docstring).

    Args:
        torchtune: the torchtune tokenizer (``encode``, ``decode``, ``bos_id``, ``eos_id``).
        truncation_side (str): vLLM's setting, kept for its readers.
    """

    def __init__(self, torchtune: Any, truncation_side: str = "left") -> None:
        self.torchtune = torchtune
        self._truncation_side = truncation_side
        self._special = _special_ids(torchtune)
        self._special_id_set = set(self._special.values())
        self._vocab_size = int(getattr(torchtune, "vocab_size", 0) or 0)
        self._max_token_id = max([self._vocab_size - 1, *self._special_id_set])

    @classmethod
    def from_pretrained(cls, path_or_repo_id: Union[str, Path], *args: Any, truncation_side: str = "left", **kwargs: Any) -> "MasTokenizer":
        return cls(torchtune_tokenizer_for(path_or_repo_id), truncation_side=truncation_side)

    # -- ids and sizes ----------------------------------------------------------------------
    def num_special_tokens_to_add(self) -> int:
        return 1 if self.bos_token_id is not None else 0

    @property
    def all_special_tokens(self) -> List[str]:
        return list(self._special)

    @property
    def all_special_ids(self) -> List[int]:
        return sorted(self._special_id_set)

    @property
    def bos_token_id(self) -> Optional[int]:
        return getattr(self.torchtune, "bos_id", None)

    @property
    def eos_token_id(self) -> Optional[int]:
        return getattr(self.torchtune, "eos_id", None)

    @property
    def pad_token_id(self) -> Optional[int]:
        return getattr(self.torchtune, "pad_id", None)

    @property
    def is_fast(self) -> bool:
        return False

    @property
    def vocab_size(self) -> int:
        return self._max_token_id + 1

    @property
    def max_token_id(self) -> int:
        return self._max_token_id

    @property
    def max_chars_per_token(self) -> int:
        return 64

    @property
    def truncation_side(self) -> str:
        return self._truncation_side

    def __hash__(self) -> int:
        return hash(id(self))

    def __len__(self) -> int:
        return self.vocab_size

    def get_vocab(self) -> Dict[str, int]:
        return {_token_string(i): i for i in range(self.vocab_size)}

    def get_added_vocab(self) -> Dict[str, int]:
        # Empty: vLLM's detokenizer then decodes every window through convert_tokens_to_string.
        return {}

    # -- text <-> ids -----------------------------------------------------------------------
    def encode(self, text: str, truncation: Optional[bool] = None, max_length: Optional[int] = None, add_special_tokens: bool = True) -> List[int]:
        ids = list(self.torchtune.encode(text, add_bos=add_special_tokens, add_eos=False))
        if truncation and max_length is not None and len(ids) > max_length:
            ids = ids[-max_length:] if self._truncation_side == "left" else ids[:max_length]
        return ids

    def __call__(self, text: Union[str, List[str]], text_pair: Optional[str] = None, add_special_tokens: bool = True, truncation: bool = False, max_length: Optional[int] = None, **kwargs: Any) -> Dict[str, Any]:
        if isinstance(text, list):
            ids = [self.encode(t, truncation, max_length, add_special_tokens) for t in text]
            return {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]}
        ids = self.encode(text, truncation, max_length, add_special_tokens)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def apply_chat_template(self, messages: Any, tools: Any = None, **kwargs: Any) -> Union[str, List[int]]:
        raise NotImplementedError("mas tokenizer: chats are rendered by the mas renderer (SegmentBuilder), not a template")

    def decode(self, ids: Union[Sequence[int], int], skip_special_tokens: bool = False) -> str:
        ids = [ids] if isinstance(ids, int) else list(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_id_set]
        ids = [i for i in ids if 0 <= i <= self._max_token_id]
        try:
            # Llama 3 cuts at EOS and drops specials unless told otherwise.
            return self.torchtune.decode(ids, truncate_at_eos=False, skip_special_tokens=False)
        except TypeError:
            try:
                return self.torchtune.decode(ids, skip_special_tokens=False)
            except TypeError:
                return self.torchtune.decode(ids)

    def convert_ids_to_tokens(self, ids: Sequence[int], skip_special_tokens: bool = False) -> List[str]:
        return [_token_string(i) for i in ids if not (skip_special_tokens and i in self._special_id_set)]

    def convert_tokens_to_ids(self, tokens: Union[str, List[str]]) -> Union[int, List[int]]:
        if isinstance(tokens, str):
            if tokens in self._special:
                return self._special[tokens]
            ids = _ids_of([tokens])
            return ids[0] if ids else -1
        return [self.convert_tokens_to_ids(t) for t in tokens]  # type: ignore[misc]

    def convert_tokens_to_string(self, tokens: List[str]) -> str:
        return self.decode(_ids_of(tokens))
