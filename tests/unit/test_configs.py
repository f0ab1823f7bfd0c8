"""Every bundled config: parses, validates against its recipe, builds, and documents itself.

Real-model configs cannot load real weights here: models are built on the meta device (free even
for 8B), and tokenizers and checkpointers are pointed at tiny files of the same family
(``mas.families``), so each component and its arguments are still exercised.
"""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch
from omegaconf import OmegaConf

from mas.config import RecipeKeys, instantiate, load_config, validate_config

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "configs"
CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
TRAIN_SAMPLE = REPO / "mas" / "assets" / "commonsense" / "train_sample" / "commonsense_train_600.json"

FINETUNE = "mas_lora_finetune"
# A word of the config name (between underscores) -> recipe module, first match wins:
# tiny_generate, tiny_eval_mmlu, llama3_1_8b_mas_distributed. Names with none of them are
# fine-tuning configs.
RECIPE_BY_NAME_WORD = {
    "generate": "mas_generate",
    "eval": "mas_eval",
    "distributed": "mas_lora_finetune_distributed",
}

# The paper's models, as their Hugging Face config.json describes them: what each config's
# builder must produce. name prefix -> (vocab, layers, dim, heads, kv heads, mlp dim, tied,
# rope base, model_type, tokenizer builder, checkpoint shards).
PAPER_MODELS = {
    "llama3_8b": (128256, 32, 4096, 32, 8, 14336, False, 500000, "LLAMA3", "llama3_tokenizer", 4),
    "llama3_1_8b": (128256, 32, 4096, 32, 8, 14336, False, 500000, "LLAMA3", "llama3_tokenizer", 4),
    "llama3_2_1b": (128256, 16, 2048, 32, 8, 8192, True, 500000, "LLAMA3_2", "llama3_tokenizer", 1),
    "llama3_2_3b": (128256, 28, 3072, 24, 8, 8192, True, 500000, "LLAMA3_2", "llama3_tokenizer", 2),
    "mistral_7b_v0_1": (32000, 32, 4096, 32, 8, 14336, False, 10000, "MISTRAL", "mistral_tokenizer", 2),
    "mistral_7b_v0_3": (32768, 32, 4096, 32, 8, 14336, False, 1000000, "MISTRAL", "mistral_tokenizer", 3),
    "qwen2_5_3b": (151936, 36, 2048, 16, 2, 11008, True, 1000000, "QWEN2", "qwen2_5_tokenizer", 2),
    "qwen2_5_7b": (152064, 28, 3584, 28, 4, 18944, False, 1000000, "QWEN2", "qwen2_5_tokenizer", 4),
}
# Table 7 of the paper: LR with LoRA on q and v.
PAPER_LR = {
    "llama3_8b": 2e-4, "llama3_1_8b": 2e-4, "llama3_2_1b": 2e-4, "llama3_2_3b": 8e-5,
    "mistral_7b_v0_1": 8e-5, "mistral_7b_v0_3": 1e-4, "qwen2_5_3b": 1e-4, "qwen2_5_7b": 1e-4,
}  # fmt: skip
# Table 7, LR_Ex column: LoRA on q, k, v, up and down.
PAPER_LR_EX = {
    "llama3_8b": 1e-4, "llama3_1_8b": 2e-4, "llama3_2_1b": 2e-4, "llama3_2_3b": 2e-4,
    "mistral_7b_v0_1": 3e-5, "mistral_7b_v0_3": 1e-4, "qwen2_5_3b": 2e-4, "qwen2_5_7b": 3e-4,
}  # fmt: skip
# model_type -> the tiny family whose files stand in for the real ones.
TINY_FAMILY_OF = {"LLAMA3": "llama3", "LLAMA3_2": "llama3_2", "QWEN2": "qwen2_untied", "MISTRAL": "mistral"}


def recipe_of(name: str) -> str:
    words = name.split("_")
    return next((recipe for word, recipe in RECIPE_BY_NAME_WORD.items() if word in words), FINETUNE)


def recipe_keys(recipe: str) -> RecipeKeys:
    """The recipe's ``KEYS``; skips (with the reason) a recipe that cannot be imported yet."""
    try:
        module = importlib.import_module(recipe)
    except ImportError as e:
        pytest.skip(f"recipe module {recipe} cannot be imported: {e}")
    keys = getattr(module, "KEYS", None)
    if not isinstance(keys, RecipeKeys):
        pytest.skip(f"recipe module {recipe} defines no KEYS yet")
    return keys


def paper_model(name: str) -> Optional[str]:
    # Longest prefix first: "llama3_2_1b" before "llama3".
    return next((m for m in sorted(PAPER_MODELS, key=len, reverse=True) if name.startswith(m + "_")), None)


FINETUNE_CONFIGS = [c for c in CONFIGS if recipe_of(c) == FINETUNE]
PAPER_CONFIGS = [c for c in FINETUNE_CONFIGS if paper_model(c)]


def header_lines(name: str) -> List[str]:
    """The leading comment block of a config file."""
    lines = []
    for line in (CONFIG_DIR / f"{name}.yaml").read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return lines


def header_overrides(name: str) -> List[List[str]]:
    """The ``key=value`` lists of every documented launch line of a config."""
    prefix = f"tune run {recipe_of(name)} --config {name} "
    return [shlex.split(line[len(prefix) :]) for line in header_lines(name) if line.startswith(prefix)]


def build_on_meta(model_cfg, dtype: str = "bf16") -> torch.nn.Module:
    from torchtune import training

    with training.set_default_dtype(training.get_dtype(dtype, device=torch.device("cpu"))), torch.device("meta"):
        return instantiate(model_cfg)


# ----------------------------------------------------------------------------------- every config
def test_the_paper_configs_are_all_there():
    for model in PAPER_MODELS:
        assert {f"{model}_mas", f"{model}_causal"} <= set(CONFIGS), model
    for model in ("llama3_2_1b", "llama3_2_3b", "qwen2_5_3b"):
        assert {f"{model}_mas_1024", f"{model}_causal_1024"} <= set(CONFIGS), model


@pytest.mark.parametrize("name", CONFIGS)
def test_config_validates_against_its_recipe(name):
    keys = recipe_keys(recipe_of(name))
    validate_config(load_config(name), keys)


@pytest.mark.parametrize("name", CONFIGS)
def test_header_names_its_launch_command(name):
    header = header_lines(name)
    assert header, f"{name}.yaml has no header comment"
    launch = re.compile(rf"tune run (--\S+ \S+ )*{recipe_of(name)} --config {re.escape(name)}(\.yaml)?( |$)")
    assert any(launch.search(line) for line in header), f"{name}.yaml's header does not show its launch command"


@pytest.mark.parametrize("name", [c for c in CONFIGS if re.search(r"_mas(_|$)", c)])
def test_mas_config_has_a_causal_twin_that_differs_only_in_attention(name):
    twin = re.sub(r"_mas(?=_|$)", "_causal", name, count=1)
    assert twin in CONFIGS, f"{name}.yaml has no causal twin {twin}.yaml"
    mas_cfg = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / f"{name}.yaml"), resolve=False)
    causal_cfg = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / f"{twin}.yaml"), resolve=False)
    assert (mas_cfg.pop("attention"), causal_cfg.pop("attention")) == ("mas", "causal")
    assert mas_cfg == causal_cfg


# ----------------------------------------------------------------------------- fine-tuning configs
@pytest.mark.parametrize("name", FINETUNE_CONFIGS)
def test_finetune_config_builds_model_optimizer_schedule_and_loss(name):
    from torchtune.modules.peft import get_adapter_params

    cfg = load_config(name)
    model = build_on_meta(cfg.model, cfg.get("dtype", "fp32"))
    adapters = get_adapter_params(model)
    assert adapters, "the model has no LoRA parameters"
    trainable = list(adapters.values())
    optimizer = instantiate(cfg.optimizer, trainable)
    scheduler = instantiate(cfg.lr_scheduler, optimizer, num_training_steps=1000)
    assert optimizer.param_groups[0]["initial_lr"] == pytest.approx(float(cfg.optimizer.lr))
    assert scheduler.get_last_lr()[0] < float(cfg.optimizer.lr)  # warm-up starts below the peak
    assert callable(instantiate(cfg.loss))
    rank = int(cfg.model.lora_rank)
    for key, value in adapters.items():
        assert rank in value.shape, key


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_builds_the_papers_model_with_its_settings(name):
    vocab, layers, dim, heads, kv_heads, hidden, tied, rope_base, model_type, tokenizer, shards = PAPER_MODELS[
        paper_model(name)
    ]
    cfg = load_config(name)
    model = build_on_meta(cfg.model)
    attn = model.layers[0].attn
    assert model.tok_embeddings.num_embeddings == vocab
    assert (len(model.layers), model.tok_embeddings.embedding_dim, attn.num_heads, attn.num_kv_heads) == (
        layers, dim, heads, kv_heads
    )  # fmt: skip
    assert model.layers[0].mlp.w1.out_features == hidden
    assert attn.pos_embeddings.base == rope_base
    assert (type(model.output).__name__ == "TiedLinear") == tied
    assert cfg.checkpointer.model_type == model_type
    assert str(cfg.tokenizer._component_).endswith("." + tokenizer)
    files = list(cfg.checkpointer.checkpoint_files)
    expected = ["model.safetensors"] if shards == 1 else [
        f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)
    ]  # fmt: skip
    assert files == expected
    # Table 6 and 7 of the paper.
    assert (cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_dropout) == (32, 64, 0.05)
    assert list(cfg.model.lora_attn_modules) == ["q_proj", "v_proj"] and not cfg.model.apply_lora_to_mlp
    assert float(cfg.optimizer.lr) == PAPER_LR[paper_model(name)]
    assert cfg.lr_scheduler._component_ == "mas.training.linear_schedule_with_warmup"
    assert cfg.lr_scheduler.num_warmup_steps == 100
    assert (cfg.batch_size, cfg.gradient_accumulation_steps, cfg.epochs) == (8, 1, 3)
    assert cfg.tokenizer.max_seq_len == (1024 if name.endswith("_1024") else 256)
    assert (cfg.dtype, cfg.device, cfg.attention_backend, cfg.pad_to_multiple_of) == ("bf16", "cuda", "auto", 128)
    assert cfg.save_merged_weights is False


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_train_and_validation_rows_partition_the_file(name):
    from mas.data.rows import RowSource, select_rows

    cfg = load_config(name)
    rows = RowSource("commonsense_170k.json", [{"i": i} for i in range(170_420)], [f"row {i}" for i in range(170_420)])
    train = [r["i"] for r in select_rows(rows, cfg.dataset.rows)]
    val = [r["i"] for r in select_rows(rows, cfg.val_dataset.rows)]
    assert len(val) == 1000 and train + val == list(range(170_420))
    assert cfg.val_dataset.source == cfg.dataset.source


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory) -> Dict[str, "object"]:
    from mas.families import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny_families")
    return {t: write_tiny_checkpoint(f, root / f) for t, f in TINY_FAMILY_OF.items()}


def _tiny_file_overrides(cfg, tiny) -> List[str]:
    """Point the config's tokenizer and checkpointer at the tiny files of the same family."""
    node = tiny.tokenizer_node()
    overrides = [f"tokenizer.{k}={node[k]}" for k in ("path", "merges_file", "special_tokens_path") if k in node]
    assert str(cfg.tokenizer._component_) == node["_component_"], "config tokenizer is not its family's"
    if "merges_file" not in cfg.tokenizer and "merges_file" in node:
        raise AssertionError("a Qwen2.5 tokenizer needs merges_file")
    return overrides + [
        f"checkpointer.checkpoint_dir={tiny.checkpoint_dir}",
        "checkpointer.checkpoint_files=[model.safetensors]",
    ]


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_tokenizer_checkpointer_and_data_work_on_tiny_files(name, tiny_checkpoints, tmp_path):
    from mas.checkpointing import hf_info_from_checkpointer

    raw = load_config(name)
    tiny = tiny_checkpoints[raw.checkpointer.model_type]
    overrides = _tiny_file_overrides(raw, tiny) + [
        f"output_dir={tmp_path / 'run'}",
        f"dataset.source={TRAIN_SAMPLE}",
        'dataset.rows="0:8"',
        'val_dataset.rows="8:12"',
    ]
    cfg = load_config(name, overrides)
    checkpointer = instantiate(cfg.checkpointer)
    info = hf_info_from_checkpointer(checkpointer)
    assert info.model_type == raw.checkpointer.model_type
    state = checkpointer.load_checkpoint()["model"]
    assert "layers.0.attn.q_proj.weight" in state
    tokenizer = instantiate(cfg.tokenizer)
    assert tokenizer.max_seq_len == raw.tokenizer.max_seq_len
    dataset = instantiate(cfg.dataset, tokenizer)
    val_dataset = instantiate(cfg.val_dataset, tokenizer)
    assert (len(dataset), len(val_dataset)) == (8, 4)
    item = dataset[0]
    assert set(item) >= {"tokens", "labels", "segment_ids"} and len(item["tokens"]) <= raw.tokenizer.max_seq_len


@pytest.mark.parametrize("name", [c for c in PAPER_CONFIGS if c.endswith("_mas")])
def test_documented_overrides_apply(name):
    """Every launch line of the header is a valid override set (five-matrix, QLoRA, all rows)."""
    from torchao.dtypes.nf4tensor import NF4Tensor
    from torchtune.modules.peft import get_adapter_params

    keys = recipe_keys(FINETUNE)
    lines = header_overrides(name)
    assert len(lines) >= 4, lines
    for overrides in lines:
        cfg = load_config(name, overrides)
        validate_config(cfg, keys)
        if not any(o.startswith("model") for o in overrides):
            continue
        model = build_on_meta(cfg.model)
        adapted = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in get_adapter_params(model)}
        if cfg.model.get("apply_lora_to_mlp"):
            assert adapted == {"q_proj", "k_proj", "v_proj", "w1", "w2", "w3"}  # torchtune adds gate (w1)
            assert float(cfg.optimizer.lr) == PAPER_LR_EX[paper_model(name)]
        if "qlora" in str(cfg.model._component_):
            layer = model.layers[0]
            for proj in (layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj, layer.attn.output_proj,
                         layer.mlp.w1, layer.mlp.w2, layer.mlp.w3):  # fmt: skip
                assert isinstance(proj.weight, NF4Tensor), f"QLoRA leaves {type(proj).__name__} in bf16"
            assert cfg.enable_activation_checkpointing is True
    assert any("qlora" in " ".join(o) for o in lines), "no QLoRA launch line"
