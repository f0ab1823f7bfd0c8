"""Greedy tokens of vLLM with the plugin equal ``mas.generate``'s, on CPU, through the test oracle.

For each family (Llama 3.2, Qwen2, Mistral), one engine holds the base model (under the mode
its "mas" entry names: ``mas`` for two families, ``causal`` for one) and two adapters (vLLM's
LoRA) of the same weights, recorded as ``mas`` and as ``causal``: chat and completion prompts,
then prefix-cache hits (a repeated prompt, and a prompt that shares only the system segment),
each time the same tokens as ``mas.generate`` in the project's own engine under the mode of the
adapter the request names. The two modes' references differ (the ranges do something), the
stock CPU backend is refused, and segments are never split.
"""

from __future__ import annotations

import gc

import pytest
from cpu_oracle import cpu_flex_oracle
from helpers import CHATS, COMPLETION, FAMILIES, llm_kwargs, mas_reference, write_adapter, write_model

MAX_TOKENS = 8


def _generate(llm, prompts_chat, prompts_text=(), lora=None):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = list(llm.chat(prompts_chat, params, lora_request=lora, use_tqdm=False)) if prompts_chat else []
    if prompts_text:
        outs += llm.generate(list(prompts_text), params, lora_request=lora, use_tqdm=False)
    return outs


#: The mode of each family's base model (the server's "mas" entry): both modes are covered.
SERVER_MODE = {"llama": "mas", "qwen2": "causal", "mistral": "mas"}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_tokens_equal_mas_generate(family, models_dir):
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    root = models_dir / f"{family}_exact"
    model = write_model(family, root, adapter_attention="mas")
    # The same weights recorded as causal: only the recorded mode tells the two adapters apart.
    adapters = {"mas": model.adapter, "causal": write_adapter(model, root / "causal_run", "causal")}
    server_mode = SERVER_MODE[family]
    prompts = [{"messages": chat} for chat in CHATS] + [COMPLETION]
    ref_base = mas_reference(model, prompts, attention=server_mode, adapter=False, max_new_tokens=MAX_TOKENS)
    ref = {mode: mas_reference(model, prompts, attention=mode, adapter=True, max_new_tokens=MAX_TOKENS) for mode in adapters}
    assert ref["mas"].tokens != ref["causal"].tokens  # the two masks differ on these prompts
    system_len = len([i for i in ref_base.prompts[0].segment_ids if i == 0])
    fresh = [[CHATS[0][0], {"role": "user", "content": "Which planet is the largest one?"}]]

    with cpu_flex_oracle():
        # The server's "mas" entry: the folder of the adapter recorded with its mode.
        llm = LLM(**llm_kwargs(model, mas_entry=str(adapters[server_mode]), lora=True, max_loras=2))
        try:
            base = _generate(llm, CHATS, [COMPLETION])
            assert [list(o.prompt_token_ids) for o in base] == [s.tokens for s in ref_base.prompts]
            assert [list(o.outputs[0].token_ids) for o in base] == ref_base.tokens
            for lora_id, (mode, folder) in enumerate(adapters.items(), start=1):
                lora = LoRARequest(f"{mode}_adapter", lora_id, str(folder))
                adapted = _generate(llm, CHATS, [COMPLETION], lora=lora)
                assert [list(o.outputs[0].token_ids) for o in adapted] == ref[mode].tokens, mode

                # Prefix cache: the same prompts again hit their cached blocks (every prompt of
                # two blocks or more; vLLM recomputes a prompt's last token) and decode the same.
                again = _generate(llm, CHATS, lora=lora)
                assert [list(o.outputs[0].token_ids) for o in again] == ref[mode].tokens[: len(CHATS)], mode
                assert all(o.num_cached_tokens >= 16 for o in again if len(o.prompt_token_ids) >= 32), mode

                # A new user turn after a cached system prompt: only the system segment's blocks
                # are reused under MAS (a block that the user segment touches depends on all of it).
                ref_fresh = mas_reference(model, [{"messages": fresh[0]}], attention=mode, adapter=True, max_new_tokens=MAX_TOKENS)
                (hit,) = _generate(llm, fresh, lora=lora)
                assert list(hit.outputs[0].token_ids) == ref_fresh.tokens[0], mode
                assert hit.num_cached_tokens >= 16, mode
                if mode == "mas":
                    assert hit.num_cached_tokens <= system_len
        finally:
            del llm
            gc.collect()


def test_merged_mas_weights_need_no_overrides(models_dir):
    """A folder whose config.json is what fine-tuning writes for MAS-merged weights (the plugin's
    architecture and the "mas" record) is served with the MAS mask by ``tokenizer_mode="mas"``
    alone."""
    import json

    from vllm import LLM

    from mas.segments import SegmentSettings
    from mas.training.run_state import mas_settings, merged_hf_config

    model = write_model("llama", models_dir / "merged")
    config_path = model.path / "config.json"
    config = merged_hf_config(json.loads(config_path.read_text()), mas_settings("mas", SegmentSettings(prompt_format="chat")))
    config_path.write_text(json.dumps(config))
    prompts = [{"messages": chat} for chat in CHATS]
    want = mas_reference(model, prompts, attention="mas", adapter=False, max_new_tokens=MAX_TOKENS).tokens
    kwargs = llm_kwargs(model, mas_entry=None, lora=False)
    del kwargs["hf_overrides"]
    with cpu_flex_oracle():
        llm = LLM(**kwargs)
        try:
            assert llm.llm_engine.vllm_config.model_config.architecture == "MasLlamaForCausalLM"
            assert [list(o.outputs[0].token_ids) for o in _generate(llm, CHATS)] == want
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

    from vllm.exceptions import VLLMValidationError

    from mas_vllm.policy import SegmentLimits, check_segments

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
    check_segments([10, 80], SegmentLimits(max_tokens=80))
    with pytest.raises(VLLMValidationError, match="prompt segment 1 has 80 tokens.*--max-num-batched-tokens 80"):
        check_segments([10, 80], SegmentLimits(max_tokens=64))
    with pytest.raises(VLLMValidationError, match="sliding window"):
        check_segments([10, 80], SegmentLimits(max_tokens=128, sliding_window=32))
