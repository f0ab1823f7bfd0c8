"""The pieces under the engine: cut points and the prefix cache's LRU and index, the slot KV cache
against torchtune's own cache, stop strings, request checks, the adapter-vs-config settings, and the compile_decode keys."""

from __future__ import annotations

import copy

import pytest
import torch

from mas.masks import CAUSAL
from mas.generation import PrefixCache, TextStream, is_cut_point, reusable_ends
from mas.serving._protocol import ChatCompletionRequest, RequestError, parse_request, prompt_messages_of


def _kv(n: int, layers: int = 2, fill: float = 0.0):
    return [(torch.full((2, n, 4), fill), torch.full((2, n, 4), fill)) for _ in range(layers)]


SEGS = [0, 0, 0, 1, 1, CAUSAL, CAUSAL]  # system, user, answer


def test_cut_points_follow_the_mas_rule():
    # Inside a bidirectional segment a prefix would miss the later tokens its own tokens see.
    assert [is_cut_point(SEGS, n, "mas") for n in range(1, 8)] == [False, False, True, False, True, True, True]
    assert all(is_cut_point(SEGS, n, "causal") for n in range(1, 8))
    assert reusable_ends(SEGS) == [3, 5, 7]
    merged = [0, 0, 0, 0, 0, CAUSAL]
    assert reusable_ends(merged) == [5, 6] and not any(is_cut_point(merged, n, "mas") for n in range(1, 5))


def test_longest_reusable_prefix_is_found_and_leaves_a_token_to_prefill():
    cache = PrefixCache(max_tokens=100, max_bytes=1 << 20)
    tokens = [1, 2, 3, 4, 5, 6, 7]
    assert cache.insert("ns", tokens, SEGS, _kv(7))
    # Same system prompt, another user turn: the 3 system tokens are reused.
    n, kv = cache.lookup("ns", [1, 2, 3, 9, 9, 9], [0, 0, 0, 1, 1, 1], "mas")
    assert n == 3 and kv is not None
    # The same user turn continued by a new one: everything through the answer.
    n, _ = cache.lookup("ns", tokens + [8, 8], SEGS + [2, 2], "mas")
    assert n == 7
    # The whole prompt cached: one token is still prefilled (its logits start the answer).
    n, _ = cache.lookup("ns", tokens, SEGS, "mas")
    assert n == 5
    # A system prompt that goes on: its first 3 tokens see the 4th, nothing is reusable.
    assert cache.lookup("ns", [1, 2, 3, 4, 9], [0, 0, 0, 0, 1], "mas") == (0, None)
    # Another namespace (adapter or attention mode) never hits; different segment ids neither.
    assert cache.lookup("other", [1, 2, 3, 9, 9], [0, 0, 0, 1, 1], "mas") == (0, None)
    assert cache.lookup("ns", [1, 2, 3, 9, 9], [0, 0, 1, 2, 2], "mas") == (0, None)
    assert cache.stats.hits == 3 and cache.stats.saved_tokens == 15


def test_lru_is_bounded_by_tokens_and_bytes_and_supersedes_prefixes():
    cache = PrefixCache(max_tokens=10, max_bytes=1 << 20)
    cache.insert("ns", [1, 2, 3], [0, 0, CAUSAL], _kv(3))
    # A longer row with the same first prompt takes over its index keys; the old row goes.
    cache.insert("ns", [1, 2, 3, 4], [0, 0, CAUSAL, CAUSAL], _kv(4))
    assert len(cache) == 1 and cache.tokens == 4
    cache.insert("ns", [5, 6, 7, 8], [0, 0, CAUSAL, CAUSAL], _kv(4))
    cache.lookup("ns", [1, 2, 3, 4, 9], [0, 0, CAUSAL, CAUSAL, CAUSAL], "mas")  # touch the first
    cache.insert("ns", [9, 9, 9], [0, 0, CAUSAL], _kv(3))  # 11 tokens > 10: the LRU row goes
    assert cache.tokens <= 10 and cache.stats.evictions == 1
    assert cache.lookup("ns", [5, 6, 7, 8, 1], [0, 0, CAUSAL, CAUSAL, CAUSAL], "mas")[0] == 0
    assert cache.lookup("ns", [1, 2, 3, 4, 1], [0, 0, CAUSAL, CAUSAL, CAUSAL], "mas")[0] == 4
    small = PrefixCache(max_tokens=100, max_bytes=_kv(3)[0][0].numel() * 4 * 4 + 1)
    assert small.insert("ns", [1, 2, 3], [0, 0, CAUSAL], _kv(3))
    assert not small.insert("ns", [1, 2, 3, 4], [0, 0, CAUSAL, CAUSAL], _kv(4))  # alone over budget


def test_slot_cache_rows_match_torchtune_cache():
    """A prefill into row 2 then a decode step over rows 0..2 gives the logits of the plain model
    run with torchtune's own KV cache (the slow twin)."""
    from mas.attention import use_mas_attention
    from mas.masks import dense_mas_mask
    from mas.models import tiny_llama3_2
    from mas.generation import install_slot_caches

    torch.manual_seed(0)
    model = use_mas_attention(tiny_llama3_2().eval())
    twin = copy.deepcopy(model)
    tokens = torch.randint(0, 1000, (1, 9))
    segs = torch.tensor([[0, 0, 0, 1, 1, 1, CAUSAL, CAUSAL, CAUSAL]])
    with torch.inference_mode():
        full = twin(tokens, mask=dense_mas_mask(segs))  # no cache: the whole sequence at once
        caches = install_slot_caches(model, rows=3, max_len=16, dtype=torch.float32)
        caches.plan_rows([2], torch.arange(8)[None], 8)
        prefill = model(tokens[:, :8], mask=dense_mas_mask(segs[:, :8]), input_pos=torch.arange(8)[None])
        slots = torch.tensor([0, 0, 8])
        mask = torch.zeros(3, 1, 9, dtype=torch.bool)
        mask[2, 0, :] = True
        caches.plan_decode(slots, 9)
        step = model(torch.tensor([[0], [0], [int(tokens[0, 8])]]), mask=mask, input_pos=slots[:, None])
    torch.testing.assert_close(prefill[0], full[0, :8], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[2, 0], full[0, 8], atol=1e-5, rtol=1e-5)
    assert caches.read(2, 9)[0][0].shape[1] == 9


class _CharTokenizer:
    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_text_stream_holds_back_what_a_stop_string_may_cut():
    stream = TextStream(_CharTokenizer(), stop=["END"])
    pieces = [stream.add(ord(c)) for c in "abEN"]
    assert [p for p, _ in pieces] == ["a", "b", "", ""]  # "EN" may start "END"
    assert stream.add(ord("x")) == ("ENx", False)
    assert stream.add(ord("E"))[0] == "" and stream.add(ord("N"))[0] == ""
    assert stream.add(ord("D")) == ("", True)
    assert stream.text == "abENx"
    plain = TextStream(_CharTokenizer())
    assert plain.add(0xFFFD) == ("", False) and plain.finish() == "\ufffd"


@pytest.mark.parametrize(
    "body, param",
    [
        ([], None),
        ({"messages": []}, "model"),
        ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 21}, "top_logprobs"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "logprobs": "yes"}, "logprobs"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ],
)
def test_request_errors_name_the_field(body, param):
    with pytest.raises(RequestError) as e:
        request = parse_request(ChatCompletionRequest, body)
        request.stop_strings()
        prompt_messages_of(request)
    assert e.value.param == param and e.value.status == 400


def test_chat_messages_map_roles_and_text_parts():
    request = parse_request(
        ChatCompletionRequest,
        {"model": "m", "messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}, {"role": "assistant", "content": "Hel"}]},
    )
    [messages] = prompt_messages_of(request)
    assert [m.role for m in messages] == ["system", "user", "assistant"]
    assert messages[1].text_content == "Hi" and not messages[2].masked


def test_a_whole_prompt_keeps_its_logits_when_its_answer_is_stored():
    """lookup_whole finds a prompt stored with its next-token logits, also after the row with its
    answer took over its index keys (the logits move with the key); another prompt finds none."""
    cache = PrefixCache(max_tokens=1000, max_bytes=1 << 30)
    logits = torch.arange(7.0)
    cache.insert("ns", [1, 2, 3, 4], [0, 0, 1, 1], _kv(4), next_logits=logits)
    kv, found = cache.lookup_whole("ns", [1, 2, 3, 4], [0, 0, 1, 1])
    assert torch.equal(found, logits) and kv[0][0].shape[1] == 4
    cache.insert("ns", [1, 2, 3, 4, 9], [0, 0, 1, 1, CAUSAL], _kv(5))
    assert len(cache) == 1  # the prompt's row was superseded...
    kv, found = cache.lookup_whole("ns", [1, 2, 3, 4], [0, 0, 1, 1])
    assert torch.equal(found, logits) and kv[0][0].shape[1] == 5  # ...and its logits moved along
    assert cache.lookup_whole("ns", [1, 2, 3, 5], [0, 0, 1, 1]) is None
    assert cache.lookup_whole("other", [1, 2, 3, 4], [0, 0, 1, 1]) is None
    assert cache.bytes == sum(e.nbytes for e in cache._entries.values())
