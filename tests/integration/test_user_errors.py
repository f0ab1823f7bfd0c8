"""Bad inputs and faults: every one stops with one line naming the key/file and the fix, exit code 2.

A table of cases, run in-process through each recipe's command line (``recipe_main(argv)``), so
the check covers exactly what a user typing ``tune run ...`` gets. ``silent_before`` records
what the case did before this check existed ("silent": exit 0 with a wrong result; "traceback":
a raw traceback; "ok": already a clear line), for the changelog of issues 11 and 22.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import pytest
import torch

import compare_results
import mas_config
import mas_eval
import mas_generate
import mas_lora_finetune
from mas.config import EXIT_USER_ERROR
import pretrain_tiny_base
from support.runs import finetune_overrides, run_finetune


@dataclass
class Case:
    """One bad input: the recipe, its arguments, the expected message, and what happened before."""

    id: str
    main: Callable
    args: Callable[[Path, Path], List[str]]  # (tmp_path, tiny_base_dir) -> argv
    message: str
    silent_before: str
    setup: Optional[Callable[[Path, Path], None]] = None
    env: Optional[dict] = None


def _ft(*extra: str) -> Callable[[Path, Path], List[str]]:
    return lambda tmp, base: ["--config", "tiny_mas", *finetune_overrides(tmp / "run", base), *extra]


def _gen(*extra: str) -> Callable[[Path, Path], List[str]]:
    return lambda tmp, base: [
        "--config", "tiny_generate", f"checkpointer.checkpoint_dir={base}", "checkpointer.pretrain_steps=30",
        "max_new_tokens=2", *extra,
    ]  # fmt: skip


def _train_once(tmp: Path, base: Path) -> None:
    run_finetune("tiny_mas", finetune_overrides(tmp / "run", base, max_steps_per_epoch=3))


def _bad_prompts(tmp: Path, base: Path) -> None:
    (tmp / "prompts.jsonl").write_text('{"user": "fine"}\n{"question": "no known field"}\n')


def _exit_with(main: Callable) -> Callable:
    """A tool's ``main`` that returns its exit code, as a command line would end."""

    def run(argv: List[str]) -> None:
        raise SystemExit(main(argv))

    return run


def _eval(*extra: str) -> Callable[[Path, Path], List[str]]:
    return lambda tmp, base: [
        "--config", "tiny_eval", f"output_dir={tmp}/eval", f"checkpointer.checkpoint_dir={base}", "checkpointer.pretrain_steps=30",
        "mode=loglik", "limit=1", "progress_bar=False", *extra,
    ]  # fmt: skip


def _prompts(text: str) -> Callable[[Path, Path], None]:
    return lambda tmp, base: (tmp / "prompts.jsonl").write_text(text)


def _truncated_adapter(tmp: Path, base: Path) -> None:
    from mas.checkpointing import ADAPTER_WEIGHTS_FILE, latest_checkpoint

    _train_once(tmp, base)
    weights = latest_checkpoint(tmp / "run") / ADAPTER_WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _truncated_base(tmp: Path, base: Path) -> None:
    import shutil

    shutil.copytree(base, tmp / "base")
    weights = tmp / "base" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


CASES = [
    Case("unknown top-level key", mas_lora_finetune.recipe_main, _ft("batch_sise=4"), r"unknown config key 'batch_sise'.*did you mean 'batch_size'", "ok"),
    Case("typo in a nested dataset key", mas_lora_finetune.recipe_main, _ft("dataset.sorce=/my.json"), r"dataset.sorce: .*no argument 'sorce' \(did you mean 'source'\?\)", "silent"),
    Case("typo in a nested val_dataset key", mas_lora_finetune.recipe_main, _ft("val_dataset.sorce=/my.json"), r"val_dataset.sorce: .*did you mean 'source'", "silent"),
    Case("negative batch size", mas_lora_finetune.recipe_main, _ft("batch_size=-1"), r"batch_size: must be >= 1, got -1", "ok"),
    Case("batch size of the wrong type", mas_lora_finetune.recipe_main, _ft("batch_size=eight"), r"batch_size: expected int, got 'eight'", "traceback"),
    Case("zero epochs", mas_lora_finetune.recipe_main, _ft("epochs=0"), r"epochs: must be >= 1", "silent"),
    Case("learning rate that is not a number", mas_lora_finetune.recipe_main, _ft("optimizer.lr=fast"), r"optimizer.lr: expected float", "traceback"),
    Case("unknown enum value in a component", mas_lora_finetune.recipe_main, _ft("dataset.truncation=cut"), r"dataset.truncation must be 'prompt' or 'drop', got 'cut'", "traceback"),
    Case("fp16, which cannot train here", mas_lora_finetune.recipe_main, _ft("dtype=fp16"), r"dtype must be 'bf16' or 'fp32', got 'fp16'", "silent"),
    Case("an unused unknown variable", mas_lora_finetune.recipe_main, _ft("my_dir=/data"), r"unknown config key 'my_dir'.*variables are allowed", "ok"),
    Case("malformed override", mas_lora_finetune.recipe_main, _ft("epochs"), r"overrides must be key=value, got 'epochs'", "ok"),
    Case("an override the shell split (unquoted spaces)", mas_lora_finetune.recipe_main, _ft("lora_attn_modules=[q_proj,", "v_proj]"), r"override 'lora_attn_modules=\[q_proj,': not a YAML value .*quote the whole override", "traceback"),
    Case("LoRA rank of zero", mas_lora_finetune.recipe_main, _ft("model.lora_rank=0"), r"model.lora_rank must be >= 1, got 0", "traceback"),
    Case("generate: LoRA dropout of 1", mas_generate.recipe_main, _gen("model.lora_dropout=1.0"), r"model.lora_dropout must be in \[0, 1\), got 1.0", "ok"),
    Case("config file that is not valid YAML", mas_lora_finetune.recipe_main, lambda t, b: ["--config", str(t / "broken.yaml")], r"broken.yaml: not a readable YAML config \(ParserError: .*line 2", "traceback",
         setup=lambda t, b: (t / "broken.yaml").write_text("epochs: [\n")),
    Case("packs longer than the model's positions", mas_lora_finetune.recipe_main, _ft("dataset.packed=True", "dataset.pack_length=2048", "batch_size=1"), r"dataset: dataset.pack_length=2048 is longer than the model's max_seq_len=1024", "traceback"),
    Case("unknown config name", mas_lora_finetune.recipe_main, lambda t, b: ["--config", "tiny_mass"], r"did you mean tiny_mas", "ok"),
    Case("unwritable output folder", mas_lora_finetune.recipe_main, _ft("output_dir=/proc/mas_cannot_write"), r"/proc/mas_cannot_write", "traceback"),
    Case("fresh run into another run's folder", mas_lora_finetune.recipe_main, _ft(), r"holds another run .*resume_from_checkpoint=True.*overwrite_output_dir=True", "silent", setup=_train_once),
    Case("resume with another batch size", mas_lora_finetune.recipe_main, _ft("max_steps_per_epoch=3", "batch_size=2", "resume_from_checkpoint=True"), r"cannot resume .*batch_size=4 \(this config: 2\)", "silent", setup=_train_once),
    Case("resume with another dataset", mas_lora_finetune.recipe_main, _ft("max_steps_per_epoch=3", 'dataset.rows="0:500"', "resume_from_checkpoint=True"), r"cannot resume .*dataset.rows=0:550 \(this config: 0:500\)", "silent", setup=_train_once),
    Case("resume and overwrite together", mas_lora_finetune.recipe_main, _ft("resume_from_checkpoint=True", "overwrite_output_dir=True"), r"contradict each other", "ok"),
    Case("single-device recipe under torchrun", mas_lora_finetune.recipe_main, _ft(), r"launched as 2 processes.*mas_lora_finetune_distributed", "silent", env={"WORLD_SIZE": "2"}),
    Case("generate: malformed prompts-file row", mas_generate.recipe_main, lambda t, b: _gen(f"prompts_file={t / 'prompts.jsonl'}")(t, b), r"prompts.jsonl, line 2: expected .user., .messages.", "ok", setup=_bad_prompts),
    Case("generate: unwritable output file, before generating", mas_generate.recipe_main, _gen("output_file=/proc/mas_no/out.jsonl"), r"/proc/mas_no", "silent"),
    Case("generate: tokenizer larger than the model's vocabulary", mas_generate.recipe_main, _gen("model.vocab_size=300", "checkpointer.vocab_size=300", "checkpointer.pretrain_steps=0", "checkpointer.checkpoint_dir={tmp}/small_vocab"), r"vocab", "traceback"),
    Case("eval: tokenizer larger than the model's vocabulary", mas_eval.recipe_main,
         lambda t, b: ["--config", "tiny_eval", f"output_dir={t}/eval", "model.vocab_size=300", "checkpointer.vocab_size=300",
                       "checkpointer.pretrain_steps=0", f"checkpointer.checkpoint_dir={t}/small_vocab", "limit=1"],
         r"vocab size mismatch", "traceback"),
    Case("eval: unwritable output folder, before loading", mas_eval.recipe_main,
         lambda t, b: ["--config", "tiny_eval", "output_dir=/proc/mas_eval_out", f"checkpointer.checkpoint_dir={b}", "checkpointer.pretrain_steps=30"],
         r"/proc/mas_eval_out", "ok"),
    Case("generate: bad sampling value", mas_generate.recipe_main, _gen("top_p=1.5"), r"top_p: must be <= 1", "ok"),
    Case("generate: top_p of 0", mas_generate.recipe_main, _gen("top_p=0"),
         r"^mas_generate: top_p must be in \(0, 1\] or None, got 0.0$", "traceback"),
    # Issue 22: paths that mean something else, inputs that cannot be right, tracebacks for user mistakes.
    Case("eval: data_dir naming one task's file", mas_eval.recipe_main, _eval("data_dir={tmp}/ARC-Easy.json", "tasks=[ARC-Challenge]"),
         r"data_dir=.*ARC-Easy.json is a file; the commonsense benchmark reads a folder with one file per task", "silent",
         setup=lambda t, b: (t / "ARC-Easy.json").write_text("[]")),
    Case("output_dir naming an unset environment variable", mas_lora_finetune.recipe_main, _ft("output_dir=$MAS_TEST_UNSET_VARIABLE/run"),
         r"output_dir=\$MAS_TEST_UNSET_VARIABLE/run: environment variable MAS_TEST_UNSET_VARIABLE is not set", "silent"),
    Case("generate: truncated adapter weights", mas_generate.recipe_main, lambda t, b: _gen(f"adapter_checkpoint={t}/run")(t, b),
         r"unreadable adapter file \(SafetensorError.*copy the checkpoint again", "traceback", setup=_truncated_adapter),
    Case("generate: prompt field that is not a string", mas_generate.recipe_main, lambda t, b: _gen(f"prompts_file={t}/prompts.jsonl")(t, b),
         r"prompts.jsonl, line 1: field 'user' must be a string, got int", "traceback", setup=_prompts('{"user": 5}\n')),
    Case("generate: prompt row with only a system message", mas_generate.recipe_main, lambda t, b: _gen(f"prompts_file={t}/prompts.jsonl")(t, b),
         r"prompts.jsonl, line 1: missing field 'user'", "silent", setup=_prompts('{"system": "Answer briefly."}\n')),
    Case("generate: messages without a user turn", mas_generate.recipe_main, lambda t, b: _gen(f"prompts_file={t}/prompts.jsonl")(t, b),
         r"prompts.jsonl, line 1: the messages have no user message", "silent",
         setup=_prompts('{"messages": [{"role": "system", "content": "Answer briefly."}]}\n')),
    Case("generate: \"instruction\": null", mas_generate.recipe_main, lambda t, b: _gen(f"prompts_file={t}/prompts.jsonl")(t, b),
         r"prompts.jsonl, line 1: missing field 'instruction'", "silent", setup=_prompts('{"instruction": null, "input": ""}\n')),
    Case("pretrain_tiny_base --steps -5", _exit_with(pretrain_tiny_base.main), lambda t, b: [str(t / "rows.jsonl"), str(t / "base"), "--steps", "-5"],
         r"pretrain_tiny_base: steps must be >= 1, got -5", "silent", setup=lambda t, b: (t / "rows.jsonl").write_text('{"text": "a row"}\n')),
    Case("compare_results given a folder", _exit_with(compare_results.main), lambda t, b: [str(t)], r"compare_results: .* is a folder; give the results_<mode>.json", "traceback"),
    Case("eval: sentencepiece tokenizer file missing (Mistral)", mas_eval.recipe_main,
         lambda t, b: ["--config", "mistral_7b_v0_1_eval", "device=cpu", f"output_dir={t}/eval", f"tokenizer.path={t}/no/tokenizer.model"],
         r"tokenizer.path: file not found: .*/no/tokenizer.model", "traceback"),
    Case("generate: truncated base weights", mas_generate.recipe_main,
         lambda t, b: ["--config", "tiny_generate", "checkpointer._component_=torchtune.training.FullModelHFCheckpointer", "~checkpointer.pretrain_steps",
                       f"checkpointer.checkpoint_dir={t}/base", "checkpointer.checkpoint_files=[model.safetensors]", "checkpointer.model_type=LLAMA3_2"],
         r"checkpointer.checkpoint_dir=.*/base: Unable to load checkpoint .*a truncated or corrupt weights file", "ok", setup=_truncated_base),
    Case("generate: max_cache_len past the model's positions", mas_generate.recipe_main, _gen("max_cache_len=4096"),
         r"max_cache_len=4096 is more than the model's max_seq_len \d+", "ok"),
    Case("eval: unknown commonsense task", mas_eval.recipe_main, _eval("tasks=[boolqq]"), r"unknown commonsense task 'boolqq'", "ok"),
    Case("mas-config: validate a file with a typo", mas_config.main, lambda t, b: ["validate", str(t / "bad.yaml")], r"unknown config key 'epoch'.*did you mean 'epochs'", "ok",
         setup=lambda t, b: (t / "bad.yaml").write_text("# recipe: mas_lora_finetune\nbase_config: tiny_mas\nepoch: 2\n")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_with_exit_code_2(case, tmp_path, tiny_base_dir, capsys, monkeypatch):
    if case.setup is not None:
        case.setup(tmp_path, tiny_base_dir)
        capsys.readouterr()
    for key, value in (case.env or {}).items():
        monkeypatch.setenv(key, value)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in case.args(tmp_path, tiny_base_dir)]
    with pytest.raises(SystemExit) as exit_info:
        case.main(argv)
    assert exit_info.value.code == EXIT_USER_ERROR, f"exit code {exit_info.value.code!r}"
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("WARNING", "INFO", "Skipping import"))]
    assert len(lines) == 1, err
    assert re.search(case.message, lines[0]), lines[0]


def test_case_table_reports_what_changed():
    """The issue asks how many cases were silent or tracebacks before: kept honest here."""
    counts = {kind: sum(c.silent_before == kind for c in CASES) for kind in ("silent", "traceback", "ok")}
    assert sum(counts.values()) == len(CASES) and counts["silent"] >= 8 and counts["traceback"] >= 4, counts


# ----------------------------------------------------------------------------- numeric guards
class ExplodingLoss(torch.nn.Module):
    """Cross-entropy whose value turns NaN from the given step on (a diverging run)."""

    def __init__(self, nan_from_call: int = 3) -> None:
        super().__init__()
        self.calls = 0
        self.nan_from_call = nan_from_call

    def forward(self, logits, targets):
        self.calls += 1
        logits = torch.cat(logits, dim=1) if isinstance(logits, list) else logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return loss * math.nan if self.calls >= self.nan_from_call else loss


def test_nonfinite_loss_stops_the_run_and_writes_no_adapter_after_it(tmp_path, tiny_base_dir, monkeypatch, capsys):
    monkeypatch.setattr("torchtune.modules.loss.CEWithChunkedOutputLoss", ExplodingLoss, raising=True)
    argv = ["--config", "tiny_mas", *finetune_overrides(tmp_path / "run", tiny_base_dir, save_every_n_steps=2, log_every_n_steps=5, lm_head_on_targets_only=False)]
    with pytest.raises(SystemExit) as exit_info:
        mas_lora_finetune.recipe_main(argv)
    assert exit_info.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert re.search(r"non-finite loss or gradient at step 3\b.*no checkpoint was written after step 2", err), err
    folders = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert folders == ["step_0000002"]
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in metrics.jsonl"))


def test_nonfinite_steps_can_be_skipped_and_counted(tmp_path, tiny_base_dir, monkeypatch):
    class OnceNaN(ExplodingLoss):
        def forward(self, logits, targets):
            loss = super().forward(logits, targets)
            return loss if self.calls != 3 else loss * math.nan

    monkeypatch.setattr("torchtune.modules.loss.CEWithChunkedOutputLoss", lambda: OnceNaN(nan_from_call=10**9), raising=True)
    recipe = run_finetune("tiny_mas", finetune_overrides(tmp_path / "run", tiny_base_dir, on_nonfinite="skip", log_every_n_steps=1, lm_head_on_targets_only=False))
    assert recipe.skipped_steps == 1
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 4, 5, 6] and train[-1]["skipped_steps"] == 1
    for name, p in recipe.model.named_parameters():
        assert torch.isfinite(p).all(), name


# ----------------------------------------------------------------------------- resumed metrics
def test_resumed_run_logs_each_step_once_and_drops_a_torn_line(tmp_path, tiny_base_dir):
    out = tmp_path / "run"
    run_finetune("tiny_mas", finetune_overrides(out, tiny_base_dir, log_every_n_steps=1, max_steps_per_epoch=6, save_every_n_steps=3))
    metrics = out / "metrics.jsonl"
    # Simulate a kill after step 5: the checkpoint of step 6 and the epoch end never happened.
    import shutil

    from mas.checkpointing import latest_checkpoint

    shutil.rmtree(latest_checkpoint(out))
    (out / "checkpoints" / "latest").write_text("step_0000003")
    lines = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= 5]
    metrics.write_text("\n".join(lines) + '\n{"kind": "train", "step": 6, "lo')
    run_finetune("tiny_mas", finetune_overrides(out, tiny_base_dir, log_every_n_steps=1, max_steps_per_epoch=6, save_every_n_steps=3, resume_from_checkpoint=True))
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


# ----------------------------------------------------------------------------- Ctrl-C and bugs
def test_ctrl_c_in_training_says_the_step_and_how_to_resume_with_exit_130(tmp_path, tiny_base_dir, monkeypatch, capsys):
    class InterruptedLoss(ExplodingLoss):
        def forward(self, logits, targets):
            loss = super().forward(logits, targets)
            if self.calls == 5:
                raise KeyboardInterrupt
            return loss

    monkeypatch.setattr("torchtune.modules.loss.CEWithChunkedOutputLoss", lambda: InterruptedLoss(nan_from_call=10**9), raising=True)
    argv = ["--config", "tiny_mas", *finetune_overrides(tmp_path / "run", tiny_base_dir, lm_head_on_targets_only=False)]
    with pytest.raises(SystemExit) as exit_info:
        mas_lora_finetune.recipe_main(argv)
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("WARNING", "INFO", "Skipping import"))]
    assert lines == [
        f"mas_lora_finetune: interrupted at step 4; resume with the same command and resume_from_checkpoint=True "
        f"(continues from {tmp_path / 'run' / 'checkpoints' / 'step_0000003'})"
    ], err
    monkeypatch.undo()
    run_finetune("tiny_mas", finetune_overrides(tmp_path / "run", tiny_base_dir, resume_from_checkpoint=True))


def test_an_internal_value_error_keeps_its_traceback(tmp_path, tiny_base_dir, monkeypatch, capsys):
    """A plain ValueError from library code is a bug: it is not reported as a one-line user error."""

    def broken(*args, **kwargs):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr("mas.training.finetune.prepare_batch", broken)
    argv = ["--config", "tiny_mas", *finetune_overrides(tmp_path / "run", tiny_base_dir)]
    with pytest.raises(ValueError, match="an internal invariant broke"):
        mas_lora_finetune.recipe_main(argv)
    assert "an internal invariant broke" not in capsys.readouterr().err, "not printed as a user error"


def test_ctrl_c_in_eval_says_the_command_resumes_with_exit_130(tmp_path, tiny_base_dir, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mas_eval, "evaluate_model", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        mas_eval.recipe_main(_eval()(tmp_path, tiny_base_dir))
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "mas_eval: interrupted; the same command resumes from the predictions written so far (resume=True)"
