"""Golden inference outputs: what ``mas.generate``, ``mas_eval`` (generate and loglik) and the
server gave on a fixed workload before the two inference engines became one.

``python tests/support/golden_inference.py`` wrote ``tests/unit/generation/golden_inference.json``
with the code of commit d850815 (two engines); ``tests/unit/generation/test_golden_inference.py``
runs the same workload through today's code and compares. Only public entry points are used
(``mas.generate``, ``mas_eval.run``), so the workload means the same thing before and after.

Seeded sampling is pinned at ``batch_size=1`` only: that is the documented contract (a seeded
prompt draws what it draws alone, whatever shares its batch).
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List

GOLDEN_FILE = Path(__file__).resolve().parents[1] / "unit" / "generation" / "golden_inference.json"

SYSTEM = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
PROMPTS: List[Dict[str, str]] = [
    {"system": SYSTEM, "user": "### Instruction:\nIs ice cold?\n\n### Response:\n"},
    {"system": SYSTEM, "user": "### Instruction:\nWhich is heavier, a stone or a feather? Answer briefly.\n\n### Response:\n"},
    {"user": "Name a colour."},
    {"system": "You are terse.", "user": "Why is the sea salty?"},
    {"system": SYSTEM, "user": "Hi"},
    {"user": "Name a colour that rhymes with bread, and then explain why it does in a sentence or two."},
]
GREEDY_CASES = [
    dict(attention=attention, batch_size=batch_size, reuse_system_cache=reuse)
    for attention in ("mas", "causal")
    for batch_size in (1, 3)
    for reuse in (False, True)
]
SAMPLED_CASES = [
    dict(temperature=1.0, seed=0),
    dict(temperature=0.8, top_k=20, seed=7),
    dict(temperature=1.3, top_p=0.9, seed=3),
]
MAX_NEW_TOKENS = 12


def case_name(case: Dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(case.items()))


def golden_model():
    """The varied tiny model of the generation tests (fp32, CPU)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from support.models import varied_tiny_model

    return varied_tiny_model()


def generate_outputs() -> Dict[str, List[List[int]]]:
    """Token ids of ``mas.generate`` for every case, in prompt order."""
    import mas
    from mas.models import tiny_llama3_tokenizer

    model, tokenizer = golden_model(), tiny_llama3_tokenizer()
    out: Dict[str, List[List[int]]] = {}
    for case in GREEDY_CASES:
        out["greedy:" + case_name(case)] = mas.generate(copy.deepcopy(model), tokenizer, PROMPTS, max_new_tokens=MAX_NEW_TOKENS, **case).tokens
    for case in SAMPLED_CASES:
        rows = [mas.generate(copy.deepcopy(model), tokenizer, [p], max_new_tokens=MAX_NEW_TOKENS, batch_size=1, stop_tokens=[], **case).tokens[0] for p in PROMPTS]
        out["sampled:" + case_name(case)] = rows
    return out


def eval_outputs(work_dir: Path) -> Dict[str, Any]:
    """``mas_eval`` on the tiny base (no adapter), 3 rows per task, both modes: each prediction
    (generate: the text; loglik: the option scores rounded to 4 decimals)."""
    import mas_eval

    from mas.config import load_config
    from mas.models import write_tiny_hf_checkpoint

    base = write_tiny_hf_checkpoint(work_dir / "base", pretrain_steps=30)
    out_dir = work_dir / "eval"
    overrides = {
        "output_dir": str(out_dir),
        "checkpointer.checkpoint_dir": str(base),
        "checkpointer.pretrain_steps": 30,
        "progress_bar": False,
        "limit": 3,
        "max_new_tokens": 8,
        "batch_size": 4,
    }
    mas_eval.run(load_config("tiny_eval", [f"{k}={v}" for k, v in overrides.items()]))
    result: Dict[str, Any] = {}
    for mode in ("generate", "loglik"):
        records = [json.loads(line) for line in (out_dir / f"predictions_{mode}.jsonl").read_text().splitlines()]
        if mode == "generate":
            result[mode] = [[r["task"], r["generation"]] for r in records]
        else:
            result[mode] = [[r["task"], {k: round(v, 4) for k, v in r["option_scores"].items()}] for r in records]
    return result


def compute() -> Dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        return {"generate": generate_outputs(), "eval": eval_outputs(Path(tmp))}


def dumps(golden: Dict[str, Any]) -> str:
    """JSON with one line per case and per prediction (diffs stay readable)."""
    lines = ["{", ' "generate": {']
    cases = list(golden["generate"].items())
    lines += [f"  {json.dumps(k)}: {json.dumps(v)}" + ("," if i < len(cases) - 1 else "") for i, (k, v) in enumerate(cases)]
    lines += [" },", ' "eval": {']
    modes = list(golden["eval"].items())
    for i, (mode, records) in enumerate(modes):
        lines.append(f"  {json.dumps(mode)}: [")
        lines += ["   " + json.dumps(r) + ("," if j < len(records) - 1 else "") for j, r in enumerate(records)]
        lines.append("  ]" + ("," if i < len(modes) - 1 else ""))
    lines += [" }", "}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    GOLDEN_FILE.write_text(dumps(compute()))
    print(f"wrote {GOLDEN_FILE}")
