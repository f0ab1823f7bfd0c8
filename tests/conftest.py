"""Shared fixtures: tiny tokenizers of each family and the tiny model, all built offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def llama3_tokenizer():
    from mas.models import tiny_llama3_tokenizer

    return tiny_llama3_tokenizer()


@pytest.fixture(scope="session")
def qwen2_tokenizer(tmp_path_factory):
    from torchtune.models.qwen2_5 import qwen2_5_tokenizer

    from mas.testing import write_qwen2_bpe

    d = write_qwen2_bpe(tmp_path_factory.mktemp("qwen2_tok"))
    return qwen2_5_tokenizer(
        str(d / "vocab.json"), str(d / "merges.txt"), special_tokens_path=str(d / "tokenizer.json")
    )


@pytest.fixture(scope="session")
def mistral_tokenizer(tmp_path_factory):
    from torchtune.models.mistral import mistral_tokenizer

    from mas.testing import write_mistral_sentencepiece

    d = write_mistral_sentencepiece(tmp_path_factory.mktemp("mistral_tok"))
    return mistral_tokenizer(str(d / "tokenizer.model"))


@pytest.fixture(params=["llama3", "qwen2", "mistral"])
def any_tokenizer(request):
    return request.getfixturevalue(f"{request.param}_tokenizer")


@pytest.fixture
def tiny_model():
    from mas.models import tiny_llama3_2

    torch.manual_seed(0)
    model = tiny_llama3_2()
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(0.02)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory) -> Path:
    """One tiny HF checkpoint (briefly pre-trained) shared by every test of the session."""
    from mas.models import write_tiny_hf_checkpoint

    return write_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny_base") / "model", pretrain_steps=30)


@pytest.fixture(scope="session")
def tiny_mas_run(tmp_path_factory, tiny_base_dir) -> Path:
    """The output_dir of a short tiny_mas fine-tuning run (for generation and evaluation tests)."""
    from support.runs import finetune_overrides, run_finetune

    out = tmp_path_factory.mktemp("tiny_mas_run")
    run_finetune("tiny_mas", finetune_overrides(out, tiny_base_dir, max_steps_per_epoch=12, save_every_n_steps=None))
    return out
