"""Bundled experiments, composed from small files instead of kept as full copies.

``configs/`` holds:

- ``base/common.yaml``: what every recipe kind shares (the paper's LoRA, the HF checkpointer);
- ``base/<recipe kind>.yaml``: the components (optimizer, schedule, loss, data, logger) every
  experiment of that recipe shares. Scalar keys and their defaults live in the recipe's options
  dataclass, not here.
- ``models/<model>.yaml``: one per model: ``about`` (facts for tools and docs: Hugging Face id,
  download line, QLoRA builder, learning rates of the paper), ``all`` (model, checkpointer,
  tokenizer: shared by training, evaluation, generation and serving), one section per recipe
  kind (``finetune``, ``distributed``, ``eval``, ``generate``, ``serve``) with what differs for
  it (e.g. the paper's learning rate), and ``variants`` (named overlays of this model, e.g.
  ``qlora``).
- ``overlays/<variant>.yaml``: variants shared by every model (``1024``, ``lora5``, ``packed``).

An experiment name is ``<model>_<kind>[_<variant>...]``: ``llama3_2_1b_mas``,
``llama3_2_1b_causal_1024``, ``llama3_1_8b_mas_distributed``, ``qwen2_5_3b_eval``,
``tiny_eval_mmlu``. ``mas``/``causal`` select the fine-tuning recipe with that attention.
"""

from __future__ import annotations

import difflib
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

from mas.errors import ConfigError

__all__ = [
    "BundledModel",
    "Experiment",
    "KIND_RECIPES",
    "bundled_config_dirs",
    "bundled_experiments",
    "bundled_models",
    "compose_experiment",
    "shared_variants",
    "parse_experiment_name",
]

#: Recipe kind -> the recipe that runs it.
KIND_RECIPES: Dict[str, str] = {
    "finetune": "mas_lora_finetune",
    "distributed": "mas_lora_finetune_distributed",
    "eval": "mas_eval",
    "generate": "mas_generate",
    "serve": "mas_serve",
}
#: Name words that pick the recipe kind (``mas``/``causal`` also set ``attention``).
_KIND_WORDS = ("mas", "causal", "eval", "generate", "serve")
_RUNS_DIR = "/tmp/mas_runs"


def bundled_config_dirs() -> List[Path]:
    """Where bundled configs live: the source checkout's ``configs/``, then a wheel's data dir."""
    dirs = [Path(__file__).resolve().parents[2] / "configs"]
    dirs.append(Path(sysconfig.get_paths()["data"]) / "share" / "mas-tune" / "configs")
    return [d for d in dirs if (d / "base").is_dir()]


def _find(relative: str) -> Optional[Path]:
    for d in bundled_config_dirs():
        if (d / relative).is_file():
            return d / relative
    return None


def _load_yaml(path: Path) -> DictConfig:
    cfg = OmegaConf.load(path)
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: a config must be a mapping of keys to values")
    return cfg


@dataclass(frozen=True)
class BundledModel:
    """One ``configs/models/<name>.yaml``.

    Attributes:
        name (str): file stem, the experiment-name prefix.
        about (Dict[str, Any]): facts for tools and docs (``hf_id``, ``download``, ``qlora``...).
        path (Path): the file.
    """

    name: str
    about: Dict[str, Any]
    path: Path

    @property
    def experiments(self) -> List[str]:
        """The experiment names this model lists (``about.experiments``)."""
        return [f"{self.name}_{suffix}" for suffix in self.about.get("experiments", [])]

    @property
    def variants(self) -> List[str]:
        """The variant names this model's file declares (``variants``), e.g. ``qlora``."""
        return sorted(self.section("variants").keys())  # type: ignore[arg-type]

    def section(self, key: str) -> DictConfig:
        node = _load_yaml(self.path).get(key)
        return node if isinstance(node, DictConfig) else OmegaConf.create({})


def bundled_models() -> List[BundledModel]:
    """Every bundled model file, by name."""
    seen: Dict[str, BundledModel] = {}
    for d in bundled_config_dirs():
        for path in sorted((d / "models").glob("*.yaml")):
            if path.stem not in seen:
                about = OmegaConf.to_container(_load_yaml(path).get("about") or {}, resolve=False)
                seen[path.stem] = BundledModel(path.stem, dict(about), path)  # type: ignore[arg-type]
    return [seen[k] for k in sorted(seen)]


def shared_variants() -> List[str]:
    """The variants every model takes (``overlays/<variant>.yaml``), e.g. ``packed``."""
    return sorted({path.stem for d in bundled_config_dirs() for path in (d / "overlays").glob("*.yaml")})


def bundled_experiments() -> List[str]:
    """Every experiment name the bundled models list (``mas-config ls``)."""
    return sorted(name for model in bundled_models() for name in model.experiments)


@dataclass(frozen=True)
class Experiment:
    """A parsed experiment name.

    Attributes:
        name (str): the name as given.
        model (BundledModel): the model file.
        kind (str): recipe kind (a key of :data:`KIND_RECIPES`).
        attention (Optional[str]): ``mas``/``causal`` for fine-tuning names, else None.
        variants (Tuple[str, ...]): overlay names, in order.
    """

    name: str
    model: BundledModel
    kind: str
    attention: Optional[str]
    variants: Tuple[str, ...]

    @property
    def recipe(self) -> str:
        return KIND_RECIPES[self.kind]


def _unknown_name(name: str) -> ConfigError:
    names = bundled_experiments()
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else "`mas-config ls` lists them"
    return ConfigError(f"config not found: {name!r} is neither a file nor a bundled experiment; {hint}")


def parse_experiment_name(name: str) -> Experiment:
    """``llama3_2_1b_causal_1024`` -> model ``llama3_2_1b``, kind ``finetune``, variant ``1024``.

    Raises:
        ConfigError: with the closest bundled names, for an unknown model, kind or variant.
    """
    models = {m.name: m for m in bundled_models()}
    # Longest model name first: "llama3_2_1b" before "llama3".
    model = next((models[m] for m in sorted(models, key=len, reverse=True) if name.startswith(m + "_")), None)
    if model is None:
        raise _unknown_name(name)
    words = name[len(model.name) + 1 :].split("_")
    if not words or words[0] not in _KIND_WORDS:
        raise _unknown_name(name)
    kind_word, variants = words[0], tuple(w for w in words[1:] if w)
    kind = {"mas": "finetune", "causal": "finetune"}.get(kind_word, kind_word)
    if "distributed" in variants:
        if kind != "finetune":
            raise _unknown_name(name)
        kind = "distributed"
        variants = tuple(v for v in variants if v != "distributed")
    for variant in variants:
        if variant not in model.section("variants") and _find(f"overlays/{variant}.yaml") is None:
            known = shared_variants() + model.variants
            close = difflib.get_close_matches(variant, known, n=1, cutoff=0.5)
            hint = f"did you mean {name[: name.rindex('_' + variant)]}_{close[0]}? " if close else ""
            raise ConfigError(
                f"config not found: {name!r} has the unknown variant {variant!r}; {hint}the variants of "
                f"{model.name}: {', '.join(sorted(known))} (`mas-config ls` lists them)"
            )
    attention = kind_word if kind_word in ("mas", "causal") else None
    return Experiment(name, model, kind, attention, variants)


def _default_output_dir(exp: Experiment) -> str:
    suffix = "".join(f"_{v}" for v in exp.variants)
    if exp.kind in ("finetune", "distributed"):
        dist = "_distributed" if exp.kind == "distributed" else ""
        return f"{_RUNS_DIR}/{exp.model.name}_${{attention}}{suffix}{dist}"
    if exp.kind == "eval":
        # One folder per evaluated adapter and prompt mask: results of different models never mix.
        return f"{_RUNS_DIR}/{exp.model.name}_eval{suffix}/${{mas_adapter_name:${{adapter_checkpoint}}}}_${{attention}}"
    return f"{_RUNS_DIR}/{exp.model.name}_{exp.kind}{suffix}"


def compose_experiment(exp: Experiment) -> DictConfig:
    """The experiment's config: base, model, variants merged in that order (see module doc).

    ``output_dir`` defaults to ``/tmp/mas_runs/<name>`` (with ``${attention}`` where the
    attention can be overridden), unless a layer sets it.
    """
    common = _find("base/common.yaml")
    layers: List[Any] = [_load_yaml(common)] if common is not None else []
    kinds = ["finetune", "distributed"] if exp.kind == "distributed" else [exp.kind]
    for kind in kinds:
        base = _find(f"base/{kind}.yaml")
        if base is None:
            raise ConfigError(f"no base config for recipe kind {kind!r} in {bundled_config_dirs()}")
        layers.append(_load_yaml(base))
    layers.append(exp.model.section("all"))
    for kind in kinds:
        layers.append(exp.model.section(kind))
    if exp.attention is not None:
        layers.append(OmegaConf.create({"attention": exp.attention}))
    model_variants = exp.model.section("variants")
    for variant in exp.variants:
        if variant in model_variants:
            layers.append(model_variants[variant])
        else:
            layers.append(_load_yaml(_find(f"overlays/{variant}.yaml")))  # type: ignore[arg-type]
    cfg = OmegaConf.merge(*layers)
    if "output_dir" not in cfg:
        cfg = OmegaConf.merge(OmegaConf.create({"output_dir": _default_output_dir(exp)}), cfg)
    return cfg  # type: ignore[return-value]


_ASSET = re.compile(r"\$\{mas_asset:([^}]*)\}")


def resolve_assets(text: str, assets_dir: Path) -> str:
    """Replace ``${mas_asset:rel}`` by the bundled file's path (so copied configs need no resolver)."""
    return _ASSET.sub(lambda m: str(assets_dir / m.group(1)), text)
