"""3D convolutions computed as one 2D convolution over time taps stacked on channels.

XLA's CPU backend runs 3D convolutions several times slower than 2D ones of the same FLOPs
(docs/results.md, "The offline video job": the tokenizer's step and I3D's features), and they
dominate the video jobs' time there. A ``kt x kh x kw`` convolution over ``[B, T, H, W, C]`` is
the same sum as a ``kh x kw`` convolution over ``[B * T', H, W, kt * C]``, whose channels are the
``kt`` frames each output frame reads: ``Conv3D`` computes it that way. Its parameters are
``nn.Conv``'s (``kernel [kt, kh, kw, C, F]`` and ``bias [F]``), so checkpoints of either load in
the other, and the outputs agree to float rounding (tests/unit/models/test_conv3d.py).
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Padding = str | Sequence[tuple[int, int]]


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """XLA's (and TensorFlow's) 'SAME' padding of one axis: the extra pixel goes at the end."""
  total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def time_taps(x: jax.Array, kernel: int, stride: int) -> jax.Array:
  """``[B, T, H, W, C]`` (already padded in time) -> ``[B, T', H, W, kernel * C]``: output frame
  ``j`` holds input frames ``j * stride + i`` for ``i < kernel``, tap-major on channels."""
  frames = (x.shape[1] - kernel) // stride + 1
  if frames < 1:
    raise ValueError(f'{x.shape[1]} frames are fewer than the temporal kernel {kernel}')
  end = (frames - 1) * stride + 1
  return jnp.concatenate([x[:, i:i + end:stride] for i in range(kernel)], axis=-1)


def conv3d(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1, 1),
           padding: Padding = 'SAME') -> jax.Array:
  """``x [B, T, H, W, C]`` convolved with ``kernel [kt, kh, kw, C, F]`` (cross-correlation, as
  ``lax.conv_general_dilated``) -> ``[B, T', H', W', F]``. ``padding``: 'SAME', 'VALID' or
  three ``(low, high)`` pairs."""
  kt, kh, kw, channels, features = kernel.shape
  st, sh, sw = strides
  if x.ndim != 5 or x.shape[-1] != channels:
    raise ValueError(f'conv3d of input {x.shape} with kernel {kernel.shape}: expected '
                     f'[B, T, H, W, {channels}]')
  if isinstance(padding, str):
    if padding not in ('SAME', 'VALID'):
      raise ValueError(f"padding={padding!r}: expected 'SAME', 'VALID' or 3 (low, high) pairs")
    padding = ([same_padding(size, k, s) for size, k, s in zip(x.shape[1:4], (kt, kh, kw),
                                                                 (st, sh, sw))]
               if padding == 'SAME' else [(0, 0)] * 3)
  time_pad, *spatial_pad = padding
  x = jnp.pad(x, [(0, 0), time_pad, (0, 0), (0, 0), (0, 0)])
  taps = time_taps(x, kt, st)
  batch, frames = taps.shape[:2]
  planes = taps.reshape((batch * frames,) + taps.shape[2:])
  # [kt, kh, kw, C, F] -> [kh, kw, kt * C, F], tap-major as time_taps stacks them.
  kernel_2d = jnp.moveaxis(kernel, 0, 2).reshape(kh, kw, kt * channels, features)
  y = jax.lax.conv_general_dilated(planes, kernel_2d.astype(planes.dtype), (sh, sw),
                                   list(spatial_pad),
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return y.reshape((batch, frames) + y.shape[1:])


class Conv3D(nn.Module):
  """``nn.Conv`` over ``[B, T, H, W, C]`` with a 3D kernel, computed by ``conv3d``; the same
  parameter names, shapes and initialisers as ``nn.Conv``."""

  features: int
  kernel_size: tuple[int, int, int]
  strides: tuple[int, int, int] = (1, 1, 1)
  padding: Padding = 'SAME'
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        tuple(self.kernel_size) + (x.shape[-1], self.features))
    y = conv3d(x, kernel, self.strides, self.padding)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros_init(), (self.features,))
    return y
