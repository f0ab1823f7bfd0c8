"""An exact cache of keys and values of prompt prefixes that end at a segment boundary.

Why it is exact: under MAS a prompt token attends to earlier tokens and to its own segment, an
answer (``CAUSAL``) token to every earlier token. So the keys and values of the first ``n``
tokens depend only on those ``n`` tokens and their segment ids, as long as no token before ``n``
shares a prompt segment with token ``n`` (:func:`is_cut_point`). Such a prefix (a system prompt;
a whole earlier conversation of a chat) computes to the same numbers in every request that
starts with it, and a new request can copy them instead of prefilling them. Under causal
attention every position is a cut point. With ``merge_system_and_user`` the system prompt and
the user turn are one segment: nothing before the end of the user turn is reusable.

Entries are whole rows (a prompt, or a prompt plus its answer) with the token ids and segment
ids they were computed from. An entry is indexed at its *reusable ends*: the end of each prompt
segment and its own end. A lookup walks the new prompt's positions with a chained hash of
``(token, segment id)`` pairs and takes the longest indexed position that is also a cut point of
the new prompt, then checks the tokens themselves (a hash collision is never trusted). Keys
carry a namespace (adapter identity and attention mode), so one cache never mixes models or
masks. The cache is a least-recently-used store bounded by tokens and by bytes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

from torch import Tensor

from mas.masks import CAUSAL, AttentionMode

__all__ = ["CachedPrefix", "PrefixCache", "PrefixCacheStats", "is_cut_point", "reusable_ends"]

KV = List[Tuple[Tensor, Tensor]]


def is_cut_point(segment_ids: Sequence[int], n: int, attention: AttentionMode) -> bool:
    """Whether tokens ``[0, n)`` never attend to token ``n`` or later.

    Args:
        segment_ids (Sequence[int]): the sequence's segment ids.
        n (int): prefix length, ``1 <= n <= len(segment_ids)``.
        attention (AttentionMode): ``"causal"``: every position is a cut point.
    """
    if attention == "causal" or n >= len(segment_ids):
        return True
    before = segment_ids[n - 1]
    return before == CAUSAL or before != segment_ids[n]


def reusable_ends(segment_ids: Sequence[int]) -> List[int]:
    """Prefix lengths an entry is indexed at: each prompt segment's end, and the whole length."""
    ends = [n for n in range(1, len(segment_ids)) if segment_ids[n - 1] >= 0 and segment_ids[n] != segment_ids[n - 1]]
    return ends + [len(segment_ids)]


def _chained_hashes(namespace: Hashable, tokens: Sequence[int], segment_ids: Sequence[int]) -> List[int]:
    """``h[n]`` identifies the prefix of length ``n`` (``h[0]`` the namespace)."""
    h = [hash(namespace)]
    for token, segment in zip(tokens, segment_ids):
        h.append(hash((h[-1], token, segment)))
    return h


@dataclass
class CachedPrefix:
    """One stored row.

    Attributes:
        tokens (List[int]), segment_ids (List[int]): what the keys and values were computed from.
        kv (KV): per layer ``(k, v)``, each ``[n_kv, len, d]``.
        nbytes (int): memory of ``kv`` (and of ``next_logits``).
        keys (List[int]): the index keys pointing at this entry.
        next_logits (Dict[int, Tensor]): prefix length -> ``[vocab]`` next-token logits after it,
            where a whole prompt ended (a prompt repeated whole then needs no prefill at all).
    """

    tokens: List[int]
    segment_ids: List[int]
    kv: KV
    nbytes: int
    keys: List[int] = field(default_factory=list)
    next_logits: Dict[int, Tensor] = field(default_factory=dict)


@dataclass
class PrefixCacheStats:
    """Counters since start-up (read by the metrics)."""

    hits: int = 0
    misses: int = 0
    saved_tokens: int = 0
    evictions: int = 0


class PrefixCache:
    """Bounded LRU of :class:`CachedPrefix` rows.

    Args:
        max_tokens (int): most tokens stored over all entries.
        max_bytes (int): most bytes of keys and values stored.
        min_tokens (int): a hit shorter than this is ignored (copying it would not pay).
    """

    def __init__(self, max_tokens: int, max_bytes: int, min_tokens: int = 1) -> None:
        self.max_tokens = max_tokens
        self.max_bytes = max_bytes
        self.min_tokens = min_tokens
        self._entries: "OrderedDict[int, CachedPrefix]" = OrderedDict()
        self._index: Dict[int, Tuple[int, int]] = {}  # key -> (entry id, prefix length)
        self._next_id = 0
        self._lock = threading.Lock()  # the engine writes, the metrics endpoint reads
        self.tokens = 0
        self.bytes = 0
        self.stats = PrefixCacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, namespace: Hashable, tokens: Sequence[int], segment_ids: Sequence[int], attention: AttentionMode) -> Tuple[int, Optional[KV]]:
        """The longest stored prefix of a prompt that can be reused, leaving one token to prefill.

        Args:
            namespace (Hashable): adapter identity and attention mode.
            tokens (Sequence[int]), segment_ids (Sequence[int]): the new prompt.
            attention (AttentionMode): the mode its prefill will use.

        Returns:
            Tuple[int, Optional[KV]]: ``(n, kv)``: slots ``[0, n)`` of ``kv`` are the prompt's
            first ``n`` tokens; ``(0, None)`` on a miss.
        """
        hashes = _chained_hashes(namespace, tokens, segment_ids)
        with self._lock:
            for n in range(len(tokens) - 1, self.min_tokens - 1, -1):
                found = self._index.get(hashes[n])
                if found is None or not is_cut_point(segment_ids, n, attention):
                    continue
                entry_id, length = found
                entry = self._entries[entry_id]
                if length != n or entry.tokens[:n] != list(tokens[:n]) or entry.segment_ids[:n] != list(segment_ids[:n]):
                    continue  # a hash collision
                self._entries.move_to_end(entry_id)
                self.stats.hits += 1
                self.stats.saved_tokens += n
                return n, entry.kv
            self.stats.misses += 1
            return 0, None

    def lookup_whole(self, namespace: Hashable, tokens: Sequence[int], segment_ids: Sequence[int]) -> Optional[Tuple[KV, Tensor]]:
        """A stored prompt equal to this one, whole, with its next-token logits: nothing of it
        needs prefilling (identical prompts, the choices of an ``n > 1`` request).

        Returns:
            Optional[Tuple[KV, Tensor]]: ``(kv, logits)`` (slots ``[0, len)`` of ``kv``; ``[vocab]``
            logits), or None.
        """
        n = len(tokens)
        key = _chained_hashes(namespace, tokens, segment_ids)[n]
        with self._lock:
            found = self._index.get(key)
            if found is None or found[1] != n:
                return None
            entry = self._entries[found[0]]
            if n not in entry.next_logits or entry.tokens[:n] != list(tokens) or entry.segment_ids[:n] != list(segment_ids):
                return None
            self._entries.move_to_end(found[0])
            self.stats.hits += 1
            self.stats.saved_tokens += n
            return entry.kv, entry.next_logits[n]

    def insert(
        self, namespace: Hashable, tokens: Sequence[int], segment_ids: Sequence[int], kv: KV, next_logits: Optional[Tensor] = None
    ) -> bool:
        """Store a row (its keys and values are final: nothing later changes them).

        Index keys of older entries whose prefix this row repeats move to it; an older entry left
        without keys (a prefix of this one, e.g. the prompt stored at prefill time once its
        answer is stored) is dropped. Least recently used entries go when over budget.

        Args:
            next_logits (Optional[Tensor]): ``[vocab]`` logits after the whole row (a prompt), kept
                for :meth:`lookup_whole`.

        Returns:
            bool: whether the row was stored (False: it alone exceeds the budget).
        """
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
        if next_logits is not None:
            nbytes += next_logits.numel() * next_logits.element_size()
        if len(tokens) > self.max_tokens or nbytes > self.max_bytes or len(tokens) < self.min_tokens:
            return False
        hashes = _chained_hashes(namespace, tokens, segment_ids)
        entry = CachedPrefix(list(tokens), list(segment_ids), kv, nbytes)
        if next_logits is not None:
            entry.next_logits[len(tokens)] = next_logits
        with self._lock:
            entry_id = self._next_id
            self._next_id += 1
            ends = set(reusable_ends(segment_ids))
            for n in range(max(self.min_tokens, 1), len(tokens) + 1):
                key = hashes[n]
                previous = self._index.get(key)
                if previous is not None:
                    older = self._entries[previous[0]]
                    if previous[1] != n or older.tokens[:n] != entry.tokens[:n] or older.segment_ids[:n] != entry.segment_ids[:n]:
                        continue  # a hash collision: leave the other entry alone
                    # This row holds the same prefix: it serves the key (and its logits) from now on.
                    older.keys.remove(key)
                    if n in older.next_logits and n not in entry.next_logits:
                        moved = entry.next_logits[n] = older.next_logits.pop(n)
                        size = moved.numel() * moved.element_size()
                        older.nbytes -= size
                        entry.nbytes += size
                        nbytes += size
                        self.bytes -= size
                    if not older.keys:
                        self._drop(previous[0])
                elif n not in ends:
                    continue
                self._index[key] = (entry_id, n)
                entry.keys.append(key)
            self._entries[entry_id] = entry
            self.tokens += len(tokens)
            self.bytes += nbytes
            while self.tokens > self.max_tokens or self.bytes > self.max_bytes:
                oldest = next(iter(self._entries))
                self._drop(oldest)
                self.stats.evictions += 1
        return True

    def _drop(self, entry_id: int) -> None:
        entry = self._entries.pop(entry_id)
        for key in entry.keys:
            if self._index.get(key, (None,))[0] == entry_id:
                del self._index[key]
        self.tokens -= len(entry.tokens)
        self.bytes -= entry.nbytes

    def clear(self) -> None:
        with self._lock:
            for entry_id in list(self._entries):
                self._drop(entry_id)
