"""Pixels as they travel (uint8) and as models see them (float32 in ``[-1, 1]``).

Batches stay uint8 from the source to the device: a quarter of float32's bytes through the
loader's worker processes, the host and the host-to-device copy, which is what bounds input
throughput at scale. ``to_float`` is the one place pixels are scaled, called inside the jitted
computations that read them (tokenizer training and encoding, the evaluation networks), so XLA
fuses it into their first op; ``to_uint8`` is its inverse for generated pixels.
"""

import jax
import jax.numpy as jnp
import numpy as np


def to_float(pixels: jax.Array | np.ndarray) -> jax.Array:
  """uint8 pixels (any shape) to float32 in ``[-1, 1]``: 0 -> -1, 255 -> 1."""
  return jnp.asarray(pixels).astype(jnp.float32) / 127.5 - 1.0


def to_uint8(pixels: np.ndarray) -> np.ndarray:
  """``to_float``'s inverse: pixels in ``[-1, 1]`` back to uint8 (rounded, clipped)."""
  return np.clip(np.round((np.asarray(pixels) + 1.0) * 127.5), 0, 255).astype(np.uint8)
