"""Feature networks (Inception, I3D) compiled once per input shape at full XLA optimisation.

They are large and compute-bound, so they are compiled at XLA's full backend optimisation even
when ``XLA_FLAGS`` lowers it for a process (the test suite does, for its tiny models; for these
networks that halves the speed on the CPU).
"""

from typing import Any, Callable

import jax

FULL_OPTIMIZATION = {'xla_backend_optimization_level': 3}


class CompiledPerShape:
  """``fn(*args)`` through an executable compiled ahead of time for each argument shape."""

  def __init__(self, fn: Callable[..., Any]):
    self._jitted = jax.jit(fn)
    self._executables = {}

  def __call__(self, *args):
    key = tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(args))
    if key not in self._executables:
      self._executables[key] = self._jitted.lower(*args).compile(
          compiler_options=FULL_OPTIMIZATION)
    return self._executables[key](*args)
