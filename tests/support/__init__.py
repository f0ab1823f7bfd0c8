"""Helpers shared by the tests: recipe runs (:mod:`support.runs`) and mask references (:mod:`support.masks`).

Importable as ``support`` because pyproject.toml's ``[tool.pytest.ini_options] pythonpath`` puts
``tests/`` on the path. Model and tokenizer fixtures live in the package, :mod:`mas.testing`.
"""
