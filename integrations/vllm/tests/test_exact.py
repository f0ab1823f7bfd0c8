"""Greedy tokens of vLLM with the plugin equal ``mas.generate``'s, on CPU, through the test oracle.

For each family (Llama 3.2, Qwen2, Mistral) and each attention mode recorded in an adapter
(``mas``, ``causal``): the base model and the adapter (vLLM's LoRA), chat and completion
prompts, batches split at segment boundaries by a small token budget, then prefix-cache hits
(a repeated prompt, and a prompt that shares only the system segment), each time the same
tokens as ``mas.generate`` in the project's own engine. The ``mas`` runs also differ from the
causal reference (the ranges do something), and the stock CPU backend is refused.
"""

from __future__ import annotations

import gc

import pytest
from cpu_oracle import cpu_flex_oracle
from helpers import CHATS, COMPLETION, FAMILIES, llm_kwargs, mas_reference, write_model

MAX_TOKENS = 8


def _generate(llm, prompts_chat, prompts_text=(), lora=None):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = list(llm.chat(prompts_chat, params, lora_request=lora, use_tqdm=False)) if prompts_chat else []
    if prompts_text:
        outs += llm.generate(list(prompts_text), params, lora_request=lora, use_tqdm=False)
    return outs


@pytest.mark.parametrize("attention", ["mas", "causal"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_tokens_equal_mas_generate(family, attention, models_dir):
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    model = write_model(family, models_dir / f"{family}_{attention}", adapter_attention=attention)
    prompts = [{"messages": chat} for chat in CHATS] + [COMPLETION]
    ref_base = mas_reference(model, prompts, attention=attention, adapter=False, max_new_tokens=MAX_TOKENS)
    ref_adapter = mas_reference(model, prompts, attention=attention, adapter=True, max_new_tokens=MAX_TOKENS)
    other = mas_reference(model, prompts, attention="causal" if attention == "mas" else "mas", adapter=True, max_new_tokens=MAX_TOKENS)

    with cpu_flex_oracle():
        # The adapter's folder as the "mas" entry: the plugin reads its recorded settings.
        llm = LLM(**llm_kwargs(model, mas_entry=str(model.adapter), lora=True))
        try:
            lora = LoRARequest(f"{attention}_adapter", 1, str(model.adapter))
            base = _generate(llm, CHATS, [COMPLETION])
            adapted = _generate(llm, CHATS, [COMPLETION], lora=lora)
            assert [list(o.prompt_token_ids) for o in base] == [s.tokens for s in ref_base.prompts]
            assert [list(o.outputs[0].token_ids) for o in base] == ref_base.tokens
            assert [list(o.outputs[0].token_ids) for o in adapted] == ref_adapter.tokens
            assert ref_adapter.tokens != other.tokens  # the two masks differ on these prompts

            # Prefix cache: the same prompts again hit their cached blocks (every prompt of two
            # blocks or more; vLLM recomputes a prompt's last token) and decode the same.
            again = _generate(llm, CHATS, lora=lora)
            assert [list(o.outputs[0].token_ids) for o in again] == ref_adapter.tokens[: len(CHATS)]
            assert all(o.num_cached_tokens >= 16 for o in again if len(o.prompt_token_ids) >= 32)

            # A new user turn after a cached system prompt: only the system segment's blocks are
            # reused under MAS (a block that the user segment touches depends on all of it).
            system_len = len([i for i in ref_base.prompts[0].segment_ids if i == 0])
            fresh = [[CHATS[0][0], {"role": "user", "content": "Which planet is the largest one?"}]]
            ref_fresh = mas_reference(model, [{"messages": fresh[0]}], attention=attention, adapter=True, max_new_tokens=MAX_TOKENS)
            (hit,) = _generate(llm, fresh, lora=lora)
            assert list(hit.outputs[0].token_ids) == ref_fresh.tokens[0]
            assert hit.num_cached_tokens >= 16
            if attention == "mas":
                assert hit.num_cached_tokens <= system_len
        finally:
            del llm
            gc.collect()


def test_stock_cpu_backend_is_refused(models_dir):
    """vLLM's CPU backend ignores the ranges: the plugin refuses to start on it."""
    from vllm import LLM

    model = write_model("llama", models_dir / "refused")
    with pytest.raises(Exception, match="ignores prefix-LM ranges"):
        LLM(**llm_kwargs(model, mas_entry={"attention": "mas", "prompt_format": "chat"}, lora=False))
    gc.collect()


def test_segments_are_never_split_and_over_budget_ones_refused(models_dir):
    """The config hook turns chunked prefill off and keeps the budget at least the context, so a
    segment is prefilled in one step (vLLM 0.32 would split one that starts where a step ends);
    the renderer's backstop refuses a segment over the budget, naming the setting."""
    from vllm import LLM

    from mas_vllm.renderer import check_segments

    model = write_model("llama", models_dir / "budget")
    with cpu_flex_oracle():
        llm = LLM(**llm_kwargs(model, mas_entry={"attention": "mas", "prompt_format": "chat"}, lora=False))
        try:
            scheduler = llm.llm_engine.vllm_config.scheduler_config
            assert not scheduler.enable_chunked_prefill and scheduler.disable_chunked_mm_input
            assert scheduler.max_num_batched_tokens >= 256  # asked for 64, below max_model_len
            long_user = " ".join(["word"] * 60)  # about 120 tokens: over the 64 asked for, served whole
            (out,) = _generate(llm, [[{"role": "user", "content": long_user}]])
            assert len(out.outputs[0].token_ids) == MAX_TOKENS
        finally:
            del llm
            gc.collect()
    items = [{"start": 0, "token_ids": [1] * 10}, {"start": 10, "token_ids": [2] * 80}]
    check_segments(items, max_tokens=80, sliding_window=None)
    with pytest.raises(ValueError, match="prompt segment 1 has 80 tokens.*--max-num-batched-tokens 80"):
        check_segments(items, max_tokens=64, sliding_window=None)
    with pytest.raises(ValueError, match="sliding window"):
        check_segments(items, max_tokens=128, sliding_window=32)
