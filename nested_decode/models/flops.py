"""Analytic FLOPs of a decode, step by step, from the same plan the sampler runs.

Counted: every matrix multiply (q/k/v/out projections, MLP, output head) and the two attention
products (QK^T and attention-weighted values), at 2 FLOPs per multiply-add, plus the elementwise
work with the per-element costs XLA's cost analysis assigns (LayerNorm and GELU about 8, softmax
about 5 per attention score, 1 per residual or bias add), which matters at the narrow widths.
Sampling (softmax over the codebook, top-k) is not counted. ``tests/unit/models/test_flops.py``
checks the totals against ``compiled.cost_analysis()``.
"""

import dataclasses
from typing import Sequence

from nested_decode.decoding.plan import DecodeStep
from nested_decode.models.transformer import TransformerConfig

LAYER_NORM_PER_ELEMENT = 8
GELU_PER_ELEMENT = 8
SOFTMAX_PER_SCORE = 5


@dataclasses.dataclass(frozen=True)
class PassFlops:
  projections: int  # q, k, v and attention output
  attention: int    # QK^T and AV
  mlp: int
  head: int
  elementwise: int

  @property
  def total(self) -> int:
    return self.projections + self.attention + self.mlp + self.head + self.elementwise


def pass_flops(config: TransformerConfig, width_factor: int, num_queries: int, num_keys: int,
               num_logits: int) -> PassFlops:
  """FLOPs of one forward pass of one sample at width ``D / width_factor``."""
  d = config.width // width_factor
  m = config.mlp_dim // width_factor
  layers = config.num_layers
  heads = config.num_heads // width_factor
  per_layer_elementwise = num_queries * (
      2 * LAYER_NORM_PER_ELEMENT * d + 3 * d  # two LayerNorms, two residual adds, one bias
      + (1 + GELU_PER_ELEMENT) * m            # bias and GELU in the MLP
      + SOFTMAX_PER_SCORE * heads * num_keys)
  return PassFlops(
      projections=layers * 2 * num_queries * d * d * 4,
      attention=layers * 2 * 2 * num_queries * num_keys * d,
      mlp=layers * 2 * 2 * num_queries * d * m,
      head=2 * num_logits * d * config.codebook_size,
      elementwise=(layers * per_layer_elementwise + num_queries * d  # position embedding add
                   + num_logits * (LAYER_NORM_PER_ELEMENT * d + config.codebook_size)))


def step_flops(config: TransformerConfig, step: DecodeStep, guided: bool) -> int:
  """FLOPs of one decode step for one sample; guidance runs a second, unconditional pass."""
  flops = pass_flops(config, step.width_factor, step.num_queries, step.num_keys,
                     step.num_logits).total
  return flops * (2 if guided else 1)


def decode_flops(config: TransformerConfig, plan: Sequence[DecodeStep],
                 guided: bool) -> list[int]:
  """Per-step FLOPs of a decode of one sample (sum them for the total)."""
  return [step_flops(config, step, guided) for step in plan]
