"""``vllm serve`` under the CPU test oracle: ``python serve_oracle.py serve MODEL [ARGS...]``.

The oracle's patches (cpu_oracle.py) are made in this process before vLLM's command line runs;
the engine process vLLM starts is forked from it and keeps them. For the served-chat test only.
"""

from __future__ import annotations

import sys

from cpu_oracle import cpu_flex_oracle

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *sys.argv[1:]]
    with cpu_flex_oracle():
        main()
