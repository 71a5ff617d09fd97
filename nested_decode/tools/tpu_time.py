"""How long the TPU compiler expects a program to run: the ``optimal_seconds`` of
``cost_analysis()`` of an executable compiled for a TPU topology (``tools/tpu_fit.py``). These are
XLA's cost-model estimates, not measurements.

Read as given, the estimate is wrong in three ways, which were measured with libtpu 0.0.52
(docs/tpu_time.md):

- The cost model charges -1 s for each ``ConcatBitcast`` custom call, a layout bitcast that the
  TPU compiler inserts itself. A one-layer MNIST train step on v5e:2x2 read -5.999 s with six.
  Each one is added back here, so it counts as zero time.
- Pallas kernels (``tpu_custom_call``, e.g. splash attention) are not modeled and count zero.
  Rows give their number (``unmodeled_kernels``) so that such a row can be read as a lower bound.
- A ``while`` loop (the layer ``scan``) is not counted once per iteration, and the cost model is
  not additive over layers. On imagenet256's baseline decode, the scanned program's estimate
  times 24 overstates the unrolled program's estimate by 29%. So ``tpu_fit`` times the unrolled
  program (``timing_config``).

On v6e, jaxlib 0.10.2 cannot read back the optimized HLO of programs whose gathers the compiler
offloads to the SparseCore (``as_text()`` fails: "async-update instruction should have 1
operands but sees 3"); k600's decode steps are such programs. ``hlo_text`` returns None for them.
A decode step is modeled well under a second, so its sentinels can be inferred from the
estimate itself (``seconds_without_sentinels``); any other such program has no modeled time.
"""

import math
from typing import Any

import jax
import ml_collections

# Dense bfloat16 peak per chip in TFLOP/s, by ``device_kind``, from Cloud TPU's system pages.
PEAK_BF16_TFLOPS = {'TPU v5 lite': 197.0, 'TPU v6 lite': 918.0, 'TPU v5': 459.0,
                    'TPU v4': 275.0}
MINUS_ONE_SECOND_CALL = 'custom_call_target="ConcatBitcast"'
UNMODELED_KERNEL_CALL = 'custom_call_target="tpu_custom_call"'


def timing_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
  """``config`` with its layers unrolled (the same model and parameters, stacked differently),
  so the cost model sees every layer; None if the scanned program is timed already (no scan, or
  a scan with one iteration)."""
  if not config.model.scan_layers or config.model.num_layers == 1:
    return None
  unrolled = config.copy_and_resolve_references()
  unrolled.model.scan_layers = False
  return unrolled


class UnreadableEstimate(ValueError):
  """A program whose HLO cannot be read and whose estimate does not say its sentinels."""


def hlo_text(executable: Any) -> str | None:
  """The optimized HLO of ``executable``, or None where jaxlib cannot read the TPU compiler's
  module back (the SparseCore programs of v6e, see the module docstring)."""
  try:
    return executable.as_text()
  except jax.errors.JaxRuntimeError as error:
    if 'async-update' not in str(error):
      raise
    return None


def seconds_without_sentinels(raw: float, least_seconds: float = 0.0) -> float:
  """The estimate of a program that the model puts under one second but whose HLO cannot be
  read, from its raw ``optimal_seconds``.

  Each sentinel takes exactly 1 s off, so such a program reads its estimate minus a whole number
  of seconds, and the estimate is the fractional part. A v6e decode step of k600 (2 layers,
  unrolled) read -3.999375 s; XLA's text dump of the same compile (``--xla_dump_to``) held 4
  ConcatBitcasts, so 0.625 ms. For a longer program any raw value is ambiguous, so only the
  caller can say the program is short. A fraction that is zero, or under ``least_seconds``
  (the program's FLOPs at the chip's peak), cannot be the estimate: that raises.
  """
  seconds = raw - math.floor(raw)
  if seconds == 0 or seconds < least_seconds:
    raise UnreadableEstimate(
        f'the TPU cost model gave {raw} s for a program whose HLO cannot be read back; its '
        f'fractional part {seconds} s is not an estimate of at least {least_seconds} s, so its '
        f'ConcatBitcast sentinels cannot be counted')
  return seconds


def modeled_seconds(executable: Any, text: str | None, short: bool = False,
                    least_seconds: float = 0.0) -> float:
  """The compiler's estimate of one run of ``executable``, with its -1 s sentinels removed:
  counted in its HLO ``text``, or, where that cannot be read (None), inferred for a ``short``
  program (modeled under one second, as every decode step is) and refused for others."""
  raw = executable.cost_analysis()['optimal_seconds']
  if text is None:
    if not short:
      raise UnreadableEstimate(
          f'the TPU cost model gave {raw} s for a program whose HLO cannot be read back, and '
          f'the program may run a second or more, so its ConcatBitcast sentinels cannot be '
          f'counted')
    return seconds_without_sentinels(raw, least_seconds)
  seconds = raw + text.count(MINUS_ONE_SECOND_CALL)
  if seconds <= 0:
    raise ValueError(f'the TPU cost model gave {raw} s, {seconds} s with its ConcatBitcast '
                     f'sentinels removed: it charges something else this module does not know')
  return seconds


def time_report(executables: list[Any], device_kind: str, short_programs: bool = False) -> dict:
  """The modeled time of running ``executables`` one after another (a decode's steps, shared
  executables repeated), its FLOPs per second and what fraction of the chip's bf16 peak that
  is (None for a chip not in ``PEAK_BF16_TFLOPS``). Each distinct executable is read once.
  ``short_programs``: each is modeled under one second (decode steps), so the time of one whose
  HLO cannot be read can still be inferred (``modeled_seconds``); ``unreadable_programs``
  counts those, and ``unmodeled_kernels`` is then None."""
  runs = {}
  for executable in executables:
    runs.setdefault(id(executable), [executable, 0])[1] += 1
  peak = PEAK_BF16_TFLOPS.get(device_kind)
  seconds = flops = kernels = unreadable = 0
  for executable, count in runs.values():
    text = hlo_text(executable)
    program_flops = executable.cost_analysis().get('flops', 0.0)
    least_seconds = program_flops / (peak * 1e12) if peak else 0.0
    seconds += count * modeled_seconds(executable, text, short_programs, least_seconds)
    flops += count * program_flops
    if text is None:
      unreadable += 1
    else:
      kernels += count * text.count(UNMODELED_KERNEL_CALL)
  tflops_per_second = flops / seconds / 1e12
  return dict(
      modeled_seconds=seconds, modeled_tflops_per_second=tflops_per_second,
      modeled_fraction_of_peak=None if peak is None else tflops_per_second / peak,
      unmodeled_kernels=None if unreadable else kernels, unreadable_programs=unreadable,
      timed_tflops_per_device=flops / 1e12)
