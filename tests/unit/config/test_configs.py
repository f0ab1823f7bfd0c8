"""Every bundled experiment: composes, validates against its recipe, builds, and keeps the paper's settings.

Real-model configs cannot load real weights here: models are built on the meta device (free even
for 8B), and tokenizers and checkpointers are pointed at tiny files of the same family
(``mas.testing``), so each component and its arguments are still exercised.
"""

from __future__ import annotations

from typing import Dict, List

import pytest
import torch
from omegaconf import OmegaConf

import mas_config
from mas.assets import ASSETS_DIR
from mas.block_mask import FLEX_TILE
from mas.config import bundled_experiments, bundled_models, instantiate, load_config, parse_experiment_name, to_options

EXPERIMENTS = bundled_experiments()
TRAIN_SAMPLE = ASSETS_DIR / "commonsense" / "train_sample" / "commonsense_train_600.json"

# The paper's models, as their Hugging Face config.json describes them: what each config's
# builder must produce. name -> (vocab, layers, dim, heads, kv heads, mlp dim, tied,
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

FINETUNE_EXPERIMENTS = [n for n in EXPERIMENTS if parse_experiment_name(n).recipe == "mas_lora_finetune"]
PAPER_FINETUNE = [n for n in FINETUNE_EXPERIMENTS if parse_experiment_name(n).model.name in PAPER_MODELS]


def options_for(name: str, overrides: List[str] = ()):
    recipe = parse_experiment_name(name).recipe
    return to_options(load_config(name, list(overrides)), mas_config.options_of(recipe), recipe)


def build_on_meta(model_cfg, dtype: str = "bf16") -> torch.nn.Module:
    from torchtune import training

    with training.set_default_dtype(training.get_dtype(dtype, device=torch.device("cpu"))), torch.device("meta"):
        return instantiate(model_cfg)


# ----------------------------------------------------------------------------------- every config
def test_the_paper_experiments_are_all_there():
    assert {m.name for m in bundled_models()} == set(PAPER_MODELS) | {"tiny"}
    for model in PAPER_MODELS:
        assert {f"{model}_mas", f"{model}_causal", f"{model}_eval"} <= set(EXPERIMENTS), model
    for model in ("llama3_2_1b", "llama3_2_3b", "qwen2_5_3b"):
        assert {f"{model}_mas_1024", f"{model}_causal_1024"} <= set(EXPERIMENTS), model
    assert {"llama3_1_8b_mas_distributed", "llama3_1_8b_causal_distributed"} <= set(EXPERIMENTS)
    for name in ("tiny_mas", "tiny_causal", "tiny_mas_distributed", "tiny_eval", "tiny_eval_mmlu",
                 "tiny_eval_summarization", "tiny_generate"):  # fmt: skip
        assert name in EXPERIMENTS


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_validates_against_its_recipe(name):
    options = options_for(name)
    assert options.model is not None and options.tokenizer is not None


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_runs_by_name_with_or_without_yaml_suffix(name):
    assert OmegaConf.to_container(load_config(name + ".yaml"), resolve=False) == OmegaConf.to_container(
        load_config(name), resolve=False
    )


@pytest.mark.parametrize("name", [n for n in EXPERIMENTS if "_mas" in n])
def test_mas_experiment_has_a_causal_twin_that_differs_only_in_attention(name):
    twin = name.replace("_mas", "_causal", 1)
    assert twin in EXPERIMENTS, f"{name} has no causal twin {twin}"
    mas_opts, causal_opts = options_for(name), options_for(twin)
    assert (mas_opts.attention, causal_opts.attention) == ("mas", "causal")
    a = OmegaConf.to_container(load_config(name), resolve=True)
    b = OmegaConf.to_container(load_config(twin), resolve=True)
    for cfg, mode in ((a, "mas"), (b, "causal")):
        assert cfg.pop("attention") == mode
        assert mode in cfg.pop("output_dir")  # one folder per attention mode
        cfg.pop("checkpointer")["output_dir"]
        cfg.get("metric_logger", {}).pop("log_dir", None)
    assert a == b


def test_output_dirs_of_bundled_experiments_never_collide():
    dirs = {}
    for name in EXPERIMENTS:
        # mas_serve writes nothing of its own: its output_dir is a variable for the checkpointer.
        out = getattr(options_for(name), "output_dir", None) or str(load_config(name).output_dir)
        assert out not in dirs, f"{name} and {dirs.get(out)} share output_dir {out}"
        dirs[out] = name


# ----------------------------------------------------------------------------- fine-tuning configs
@pytest.mark.parametrize("name", FINETUNE_EXPERIMENTS)
def test_finetune_config_builds_model_optimizer_schedule_and_loss(name):
    from torchtune.modules.peft import get_adapter_params

    opts = options_for(name)
    model = build_on_meta(opts.model, opts.dtype)
    adapters = get_adapter_params(model)
    assert adapters, "the model has no LoRA parameters"
    trainable = list(adapters.values())
    optimizer = instantiate(opts.optimizer, trainable)
    scheduler = instantiate(opts.lr_scheduler, optimizer, num_training_steps=1000)
    assert optimizer.param_groups[0]["initial_lr"] == pytest.approx(float(opts.optimizer.lr))
    assert scheduler.get_last_lr()[0] < float(opts.optimizer.lr)  # warm-up starts below the peak
    assert callable(instantiate(opts.loss))
    rank = int(opts.model.lora_rank)
    for key, value in adapters.items():
        assert rank in value.shape, key


@pytest.mark.parametrize("name", PAPER_FINETUNE)
def test_paper_config_builds_the_papers_model_with_its_settings(name):
    model_name = parse_experiment_name(name).model.name
    vocab, layers, dim, heads, kv_heads, hidden, tied, rope_base, model_type, tokenizer, shards = PAPER_MODELS[model_name]
    opts = options_for(name)
    model = build_on_meta(opts.model)
    attn = model.layers[0].attn
    assert model.tok_embeddings.num_embeddings == vocab
    assert (len(model.layers), model.tok_embeddings.embedding_dim, attn.num_heads, attn.num_kv_heads) == (
        layers, dim, heads, kv_heads
    )  # fmt: skip
    assert model.layers[0].mlp.w1.out_features == hidden
    assert attn.pos_embeddings.base == rope_base
    assert (type(model.output).__name__ == "TiedLinear") == tied
    assert opts.checkpointer.model_type == model_type
    assert str(opts.tokenizer._component_).endswith("." + tokenizer)
    files = list(opts.checkpointer.checkpoint_files)
    expected = ["model.safetensors"] if shards == 1 else [
        f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)
    ]  # fmt: skip
    assert files == expected
    # Table 6 and 7 of the paper.
    assert (opts.model.lora_rank, opts.model.lora_alpha, opts.model.lora_dropout) == (32, 64, 0.05)
    assert list(opts.model.lora_attn_modules) == ["q_proj", "v_proj"] and not opts.model.apply_lora_to_mlp
    assert float(opts.optimizer.lr) == PAPER_LR[model_name]
    assert opts.lr_scheduler._component_ == "mas.training.linear_schedule_with_warmup"
    assert opts.lr_scheduler.num_warmup_steps == 100
    assert (opts.batch_size, opts.gradient_accumulation_steps, opts.epochs) == (8, 1, 3)
    assert opts.tokenizer.max_seq_len == (1024 if name.endswith("_1024") else 256)
    assert (opts.dtype, opts.device, opts.attention_backend, opts.pad_to_multiple_of) == ("bf16", "auto", "auto", 128)
    assert opts.save_merged_weights is False


@pytest.mark.parametrize("name", PAPER_FINETUNE)
def test_paper_config_train_and_validation_rows_partition_the_file(name):
    from mas.data.rows import RowSource, select_rows

    opts = options_for(name)
    rows = RowSource("commonsense_170k.json", [{"i": i} for i in range(170_420)], [f"row {i}" for i in range(170_420)])
    train = [r["i"] for r in select_rows(rows, opts.dataset.rows)]
    val = [r["i"] for r in select_rows(rows, opts.val_dataset.rows)]
    assert len(val) == 1000 and train + val == list(range(170_420))
    assert opts.val_dataset.source == opts.dataset.source


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory) -> Dict[str, "object"]:
    from mas.testing import write_tiny_checkpoint

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


@pytest.mark.parametrize("name", PAPER_FINETUNE)
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
    opts = options_for(name, overrides)
    checkpointer = instantiate(opts.checkpointer)
    info = hf_info_from_checkpointer(checkpointer)
    assert info.model_type == raw.checkpointer.model_type
    state = checkpointer.load_checkpoint()["model"]
    assert "layers.0.attn.q_proj.weight" in state
    tokenizer = instantiate(opts.tokenizer)
    assert tokenizer.max_seq_len == raw.tokenizer.max_seq_len
    dataset = instantiate(opts.dataset, tokenizer)
    val_dataset = instantiate(opts.val_dataset, tokenizer)
    assert (len(dataset), len(val_dataset)) == (8, 4)
    item = dataset[0]
    assert set(item) >= {"tokens", "labels", "segment_ids"} and len(item["tokens"]) <= raw.tokenizer.max_seq_len


@pytest.mark.parametrize("model_name", sorted(PAPER_MODELS))
def test_model_variants_qlora_and_five_matrix_lora(model_name):
    """The variants every model file declares: QLoRA (NF4 base) and the paper's five-matrix LoRA."""
    from torchao.dtypes.nf4tensor import NF4Tensor
    from torchtune.modules.peft import get_adapter_params

    five = options_for(f"{model_name}_mas_lora5")
    model = build_on_meta(five.model)
    adapted = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in get_adapter_params(model)}
    assert adapted == {"q_proj", "k_proj", "v_proj", "w1", "w2", "w3"}  # torchtune adds gate (w1)
    assert float(five.optimizer.lr) == PAPER_LR_EX[model_name]

    qlora = options_for(f"{model_name}_mas_qlora")
    assert qlora.enable_activation_checkpointing is True
    layer = build_on_meta(qlora.model).layers[0]
    for proj in (layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj, layer.attn.output_proj,
                 layer.mlp.w1, layer.mlp.w2, layer.mlp.w3):  # fmt: skip
        assert isinstance(proj.weight, NF4Tensor), f"QLoRA leaves {type(proj).__name__} in bf16"


@pytest.mark.parametrize("model", [m for m in bundled_models() if m.name in PAPER_MODELS], ids=lambda m: m.name)
def test_model_file_documents_its_download_and_experiments(model):
    about = model.about
    assert about["download"].startswith(f"tune download {about['hf_id']} --output-dir ")
    header = model.path.read_text().splitlines()[0]
    assert header.startswith("#") and f"{model.name}_mas" in header
    for name in model.experiments:
        assert name in EXPERIMENTS


# ----------------------------------------------------------------------------- speed settings (issue 12)
@pytest.mark.parametrize("model_name", sorted(PAPER_MODELS) + ["tiny"])
def test_packing_is_an_override_of_every_model_with_a_throughput_variant(model_name):
    """Packing is off in the paper configs and on in ``<model>_mas_packed`` (the overlay: one
    1024-token pack per step, about the paper's 8 examples) and in ``<model>_{mas,causal}_throughput``
    (packs of 1024-4096 tokens); validation stays unpacked."""
    assert options_for(f"{model_name}_mas").dataset.packed is False
    packed = options_for(f"{model_name}_mas_packed")
    assert (packed.dataset.packed, packed.dataset.pack_length, packed.batch_size) == (True, 1024, 1)
    for name in (f"{model_name}_mas_packed", f"{model_name}_mas_throughput", f"{model_name}_causal_throughput"):
        opts = options_for(name)
        assert opts.dataset.packed is True and 1024 <= opts.dataset.pack_length <= 4096, name
        # Whole flex tiles (one compiled shape), and every example fits in a pack.
        assert opts.dataset.pack_length % FLEX_TILE == 0, name
        assert opts.dataset.pack_length >= opts.tokenizer.max_seq_len, name
        assert not opts.val_dataset.get("packed", False), name
        assert opts.attention == name.split("_")[-2], name


@pytest.mark.parametrize("name", PAPER_FINETUNE)
def test_paper_finetune_configs_compile_and_keep_the_step_free_of_host_syncs(name):
    """Where it pays (GPU configs): compiled model and loss, batches prepared in loader workers,
    the LM head on target rows, 128-token buckets and a fused AdamW (no CPU step counters)."""
    opts = options_for(name)
    assert opts.compile is True
    assert opts.num_workers >= 1
    assert opts.lm_head_on_targets_only is True
    assert opts.pad_to_multiple_of == 128
    assert opts.optimizer.fused is True


def test_the_tiny_cpu_model_neither_compiles_nor_starts_workers():
    opts = options_for("tiny_mas")
    assert (opts.compile, opts.num_workers) == (False, 0)
