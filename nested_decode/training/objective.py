"""The masked-token objective with nested joint training and online distillation.

Per example r ~ U(0, 1) and ceil(cos(pi/2 r) * N) random tokens are masked (MaskGIT), drawn among
the tokens the task generates (given tokens are never masked); the loss is cross-entropy on masked
positions only, with label smoothing. Every configured width sees the same
masked batch; the full model is the teacher, and a sub-model's loss is
``lam * CE(labels) + (1 - lam) * CE(stop_gradient(teacher probabilities))``.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def random_mask(rng: jax.Array, batch: int, length: int,
                maskable: np.ndarray | None = None) -> jax.Array:
  """Boolean [B, N]: per row, ceil(cos(pi/2 * r) * M) random positions with r ~ U(0, 1), drawn
  among the ``M`` positions where ``maskable [N]`` is True (all of them by default)."""
  maskable = np.ones(length, bool) if maskable is None else np.asarray(maskable, bool)
  num_maskable = int(maskable.sum())
  ratio_rng, order_rng = jax.random.split(rng)
  ratio = jax.random.uniform(ratio_rng, (batch, 1))
  count = jnp.clip(jnp.ceil(jnp.cos(jnp.pi / 2 * ratio) * num_maskable), 1, num_maskable)
  scores = jnp.where(maskable, jax.random.uniform(order_rng, (batch, length)), 2.0)
  ranks = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)
  return ranks < count


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1)


def smoothed_cross_entropy(logits: jax.Array, targets: jax.Array,
                           label_smoothing: float) -> jax.Array:
  """Per-position cross-entropy against one-hot targets smoothed towards uniform."""
  num_classes = logits.shape[-1]
  soft = (jax.nn.one_hot(targets, num_classes) * (1 - label_smoothing)
          + label_smoothing / num_classes)
  return soft_cross_entropy(logits, soft)


def soft_cross_entropy(logits: jax.Array, target_probs: jax.Array) -> jax.Array:
  return -jnp.sum(target_probs * jax.nn.log_softmax(logits), axis=-1)


def distillation_cross_entropy(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """Cross-entropy to the teacher's probabilities; no gradient flows into the teacher."""
  return soft_cross_entropy(student_logits, jax.nn.softmax(jax.lax.stop_gradient(teacher_logits)))


def nested_losses(logits_by_width: dict[int, jax.Array], targets: jax.Array, mask: jax.Array,
                  label_smoothing: float, distill_lambda: jax.Array | float
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Sum of per-width losses and metrics; ``logits_by_width[1]`` is the teacher."""
  teacher = logits_by_width[1]
  total, metrics = 0.0, {}
  for factor, logits in sorted(logits_by_width.items()):
    label_loss = masked_mean(smoothed_cross_entropy(logits, targets, label_smoothing), mask)
    if factor == 1:
      loss = label_loss
    else:
      distill = masked_mean(distillation_cross_entropy(logits, teacher), mask)
      loss = distill_lambda * label_loss + (1 - distill_lambda) * distill
      metrics[f'distill_loss/p{factor}'] = distill
    total = total + loss
    metrics[f'loss/p{factor}'] = loss
    metrics[f'accuracy/p{factor}'] = masked_mean(jnp.argmax(logits, -1) == targets, mask)
  return total, metrics


def linear_lambda(step: jax.Array, num_steps: int, start: float, end: float) -> jax.Array:
  """Distillation weight on the labels, moving linearly from ``start`` to ``end``."""
  fraction = jnp.clip(step / max(num_steps - 1, 1), 0.0, 1.0)
  return start + (end - start) * fraction


def widths_in_order(widths: Sequence[int]) -> tuple[int, ...]:
  if 1 not in widths:
    raise ValueError(f'Nested training needs the full model (factor 1) as teacher; got {widths}')
  return tuple(sorted(set(widths)))
