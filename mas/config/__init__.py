"""Recipe configs: typed options, bundled experiments, strict checks, one-line errors.

- :func:`option` / :func:`component` declare a recipe's keys once (type, default, reason);
- :func:`load_config` finds a config (file or bundled experiment name) and applies overrides;
- :func:`to_options` checks it all the way down and returns the typed options;
- :func:`parse` is the recipes' command line; :func:`report_user_errors` their error style.
"""

from mas.config._bundled import (
    KIND_RECIPES,
    BundledModel,
    Experiment,
    bundled_config_dirs,
    bundled_experiments,
    bundled_models,
    shared_variants,
    compose_experiment,
    parse_experiment_name,
)
from mas.config._cli import EXIT_INTERRUPTED, EXIT_USER_ERROR, format_help, instantiate, parse, report_user_errors, run_reporting_user_errors
from mas.config._components import check_components, import_component
from mas.config._load import load_config, resolved_yaml, to_options, validate_config, with_defaults
from mas.config._options import REQUIRED, OptionInfo, check_value, component, describe_type, option, option_infos, suggest
from mas.errors import ConfigError

__all__ = [
    "BundledModel",
    "ConfigError",
    "EXIT_INTERRUPTED",
    "EXIT_USER_ERROR",
    "Experiment",
    "KIND_RECIPES",
    "OptionInfo",
    "REQUIRED",
    "bundled_config_dirs",
    "bundled_experiments",
    "bundled_models",
    "shared_variants",
    "check_components",
    "check_value",
    "component",
    "compose_experiment",
    "describe_type",
    "format_help",
    "import_component",
    "instantiate",
    "load_config",
    "option",
    "option_infos",
    "parse",
    "parse_experiment_name",
    "report_user_errors",
    "resolved_yaml",
    "run_reporting_user_errors",
    "suggest",
    "to_options",
    "validate_config",
    "with_defaults",
]
