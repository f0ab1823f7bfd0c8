"""``torch.compile`` with a budget of compiled shapes, and no silent fallback past it.

Dynamo keeps one compiled graph per input signature (shapes, dtypes, grad mode, inference-mode
tensors...) of a code object. Past ``torch._dynamo.config.recompile_limit`` (8 by default) it
logs one warning and then runs every *new* signature of that function uncompiled, for the rest
of the process: FlexAttention then materialises the whole score matrix and a compiled decode
step becomes an eager one, and nothing but a slower run says so.

:func:`compile_with_budget` is the one place this project compiles a function that sees a
bounded but changing set of shapes (the FlexAttention wrapper, the block-table builder, the
decode step). It gives that call its own budget instead of the global limit:

- ``recompile_limit=max_shapes`` with ``isolate_recompiles=True``: the budget is counted for
  this wrapper alone, so a caller that buckets its lengths gets every bucket compiled, and no
  global dynamo setting changes (other users of the same code object keep theirs);
- ``fullgraph=True``: a graph break would be another silent slowdown, and with it dynamo raises
  ``FailOnRecompileLimitHit`` at the limit instead of falling back quietly (a function that
  cannot be one graph is recompiled in pieces, with one warning: then the budget's limit is
  dynamo's quiet one again);
- past the budget, one loud one-line warning names the function, the budget and the fix, and
  the call runs uncompiled (``on_exceed="warn"``, correct but slow), or it raises
  :class:`RecompileBudgetExceeded` (``on_exceed="raise"``).

Inside an already compiled region (a compiled model calling the FlexAttention wrapper) the
plain function is called and traced into the outer graph.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Generic, Literal, TypeVar

import torch
from torch._dynamo.exc import FailOnRecompileLimitHit, Unsupported

__all__ = ["CompiledWithBudget", "OnExceed", "RecompileBudgetExceeded", "compile_with_budget"]

log = logging.getLogger(__name__)

R = TypeVar("R")
OnExceed = Literal["warn", "raise"]


class RecompileBudgetExceeded(RuntimeError):
    """A budgeted compiled function met more input signatures than its budget allows."""


class CompiledWithBudget(Generic[R]):
    """A function compiled with static shapes and at most ``max_shapes`` compiled signatures.

    Args:
        fn (Callable[..., R]): the function to compile (pure tensor code, one graph).
        name (str): what the function is, for the message (e.g. ``"FlexAttention"``).
        max_shapes (int): compiled signatures allowed; size it to the shapes the callers produce
            (e.g. the number of length buckets, times train/eval).
        fix (str): how a user gets back under the budget, for the message.
        on_exceed (OnExceed): past the budget, ``"warn"`` once and run ``fn`` uncompiled, or
            ``"raise"`` :class:`RecompileBudgetExceeded`.
        **compile_kwargs: more ``torch.compile`` arguments (``backend``, ``mode``).

    Attributes:
        uncompiled_calls (int): calls that ran ``fn`` uncompiled because the budget was spent.
    """

    def __init__(
        self,
        fn: Callable[..., R],
        *,
        name: str,
        max_shapes: int,
        fix: str,
        on_exceed: OnExceed = "warn",
        **compile_kwargs: Any,
    ) -> None:
        if max_shapes < 1:
            raise ValueError(f"max_shapes must be >= 1, got {max_shapes}")
        if on_exceed not in ("warn", "raise"):
            raise ValueError(f"on_exceed must be 'warn' or 'raise', got {on_exceed!r}")
        self.fn = fn
        self.name = name
        self.max_shapes = max_shapes
        self.fix = fix
        self.on_exceed = on_exceed
        self.uncompiled_calls = 0
        self._compile_kwargs = compile_kwargs
        self._compiled = self._compile(fullgraph=True)

    def _compile(self, fullgraph: bool) -> Callable[..., R]:
        return torch.compile(
            self.fn,
            dynamic=False,  # a dynamic-shape recompile breaks flex's CPU kernel in torch 2.13
            fullgraph=fullgraph,
            recompile_limit=self.max_shapes,
            isolate_recompiles=True,
            **self._compile_kwargs,
        )

    def message(self) -> str:
        """The one-line report of a spent budget."""
        return (
            f"{self.name}: more than {self.max_shapes} distinct input shapes in this process, its "
            f"compile budget (past it torch would silently run it uncompiled); {self.fix}"
        )

    def __call__(self, *args: Any, **kwargs: Any) -> R:
        if torch.compiler.is_compiling():
            return self.fn(*args, **kwargs)
        try:
            return self._compiled(*args, **kwargs)
        except FailOnRecompileLimitHit:
            if self.on_exceed == "raise":
                raise RecompileBudgetExceeded(self.message()) from None
        except Unsupported as graph_break:
            # A model whose step cannot be one graph (e.g. a quantized weight type dynamo cannot
            # trace whole) still runs compiled, in pieces; the budget stays isolated.
            log.warning("%s has a graph break (%s); compiling it in pieces", self.name, str(graph_break).splitlines()[0])
            self._compiled = self._compile(fullgraph=False)
            return self._compiled(*args, **kwargs)
        if self.uncompiled_calls == 0:
            log.warning("%s; running it uncompiled (slow) from now on for new shapes", self.message())
        self.uncompiled_calls += 1
        return self.fn(*args, **kwargs)


def compile_with_budget(
    fn: Callable[..., R],
    *,
    name: str,
    max_shapes: int,
    fix: str,
    on_exceed: OnExceed = "warn",
    **compile_kwargs: Any,
) -> CompiledWithBudget[R]:
    """``fn`` compiled with its own budget of ``max_shapes`` signatures (see :class:`CompiledWithBudget`)."""
    return CompiledWithBudget(fn, name=name, max_shapes=max_shapes, fix=fix, on_exceed=on_exceed, **compile_kwargs)
