"""MaskGIT-style VQGAN image tokenizers and MAGVIT-style causal 3D video tokenizers.

Images are float32 NHWC in [-1, 1]. The encoder halves the resolution between consecutive
channel levels, so ``H x W`` images become ``H/f x W/f`` grids of codebook ids with
``f = 2 ** (len(channel_multipliers) - 1)``: 28x28 -> 7x7 with three levels, 256x256 -> 16x16
with the paper's five (multipliers (1, 1, 2, 2, 4), 2 res blocks, 1024 codes of 256 dims).

Videos are float32 ``[B, T, H, W, C]``; with ``video=True`` every convolution is 3D and
causal in time (padded only at the front with copies of the first frame), and the levels
flagged in ``temporal_downsample`` also halve time. ``T = 1 + t*k`` frames become ``1 + k``
latent frames (``t = 2 ** sum(temporal_downsample)``): latent frame 0 encodes frame 0 alone and
latent frame ``j > 0`` frames ``t*(j-1)+1 .. t*j``, and no latent frame sees a later frame.
So the tokens of the first ``1 + t*c`` frames of a clip are the tokens of those frames alone:
frame prediction can give them as known tokens. 17 frames -> 5 latent frames with
``t = 4`` (two temporally downsampling levels), as in MAGVIT-v2.

The training pieces are pure functions: ``tokenizer_loss`` (L2 reconstruction + codebook +
commitment), dead-code restarts (``update_usage_ema`` and ``restart_dead_codes``) and an optional
non-saturating GAN loss with an R1 penalty for a ``PatchDiscriminator``.
"""

from typing import Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nested_decode.models import conv3d, partitioning


class TokenizerConfig(NamedTuple):
  """Static description of the tokenizer (hashable, so it can key jit caches)."""
  image_channels: int
  base_channels: int
  channel_multipliers: tuple[int, ...]  # one per resolution level, finest first
  num_res_blocks: int
  embedding_dim: int
  codebook_size: int
  commitment_cost: float = 0.25
  num_groups: int = 8  # GroupNorm groups; must divide every channel count
  video: bool = False  # 3D causal convolutions over [B, T, H, W, C]
  temporal_downsample: tuple[bool, ...] = ()  # video: per downsampling level, halve time too

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.channel_multipliers) - 1)

  @property
  def temporal_factor(self) -> int:
    return temporal_factor(self.temporal_downsample)

  @property
  def level_channels(self) -> tuple[int, ...]:
    return tuple(self.base_channels * m for m in self.channel_multipliers)

  def latent_shape(self, *sizes: int) -> tuple[int, ...]:
    """The id grid of ``(height, width)`` images or ``(frames, height, width)`` clips; raises if
    the sizes do not fit the downsampling."""
    *frames, height, width = sizes
    if len(sizes) != (3 if self.video else 2):
      raise ValueError(f'{"Video" if self.video else "Image"} tokenizer got sizes {sizes}; '
                       f'expected {"(frames, height, width)" if self.video else "(height, width)"}')
    f = self.downsample_factor
    if height % f or width % f:
      raise ValueError(f'Frame size {height}x{width} is not divisible by the downsampling factor '
                       f'{f} (2**(len(channel_multipliers) - 1)).')
    spatial = (height // f, width // f)
    if not self.video:
      return spatial
    t = self.temporal_factor
    if (frames[0] - 1) % t:
      raise ValueError(f'{frames[0]} frames do not fit the causal temporal factor {t}: need '
                       f'1 + {t}*k frames (pad clips with causal_frames)')
    return (1 + (frames[0] - 1) // t,) + spatial

  def validate(self) -> None:
    """Raises ValueError for configs the modules cannot build."""
    if not self.channel_multipliers:
      raise ValueError('channel_multipliers needs at least one level.')
    bad = [c for c in self.level_channels if c % self.num_groups]
    if bad:
      raise ValueError(f'num_groups={self.num_groups} does not divide the channel counts {bad}.')
    levels = len(self.channel_multipliers) - 1
    if self.temporal_downsample and (not self.video or len(self.temporal_downsample) != levels):
      raise ValueError(f'temporal_downsample={self.temporal_downsample} needs video=True and one '
                       f'flag per downsampling level ({levels}).')


def temporal_factor(temporal_downsample) -> int:
  """How many frames a latent frame after the first covers: 2 per halving level."""
  return 2 ** sum(bool(t) for t in temporal_downsample)


def causal_frames(num_frames: int, temporal_factor: int) -> int:
  """Frames a causal tokenizer encodes for a ``num_frames`` clip: the next ``1 + t*k``."""
  return 1 + -(-(num_frames - 1) // temporal_factor) * temporal_factor


def pad_to_causal(videos, temporal_factor: int):
  """``[B, T, ...]`` -> ``[B, causal_frames(T), ...]`` by repeating the last frame (numpy in,
  numpy out; jax in, jax out)."""
  num_frames = videos.shape[1]
  frames = np.minimum(np.arange(causal_frames(num_frames, temporal_factor)), num_frames - 1)
  return videos[:, frames]


def conv(x: jax.Array, features: int, kernel: int, name: str, stride: int = 1,
         temporal_stride: int = 1) -> jax.Array:
  """``nn.Conv`` with 'SAME' padding over ``[B, H, W, C]``; over ``[B, T, H, W, C]`` a 3D conv
  (``conv3d.Conv3D``) with the same kernel size in time, causal: time is front-padded with the
  first frame.

  Call inside a compact method: the convolution becomes the caller's submodule ``name``. The
  output stays split over the batch on a mesh (``partitioning.constrain_batch``): the kernels are
  FSDP-sharded on their largest dimension, which XLA would otherwise carry into the features.
  """
  if x.ndim == 4:
    y = nn.Conv(features, (kernel, kernel), strides=(stride, stride), name=name)(x)
    return partitioning.constrain_batch(y)
  if kernel > 1:
    x = jnp.concatenate([x[:, :1]] * (kernel - 1) + [x], axis=1)
  pads = [conv3d.same_padding(size, kernel, stride) for size in x.shape[2:4]]
  y = conv3d.Conv3D(features, (kernel,) * 3, strides=(temporal_stride, stride, stride),
                    padding=[(0, 0)] + pads, name=name)(x)
  return partitioning.constrain_batch(y)


def group_norm(x: jax.Array, num_groups: int, name: str) -> jax.Array:
  """``nn.GroupNorm``; videos are normalised frame by frame, so that no statistic mixes a frame
  with later ones (the encoder stays causal)."""
  norm = nn.GroupNorm(num_groups, name=name)
  if x.ndim == 4:
    return norm(x)
  return norm(x.reshape((-1,) + x.shape[2:])).reshape(x.shape)


class ResBlock(nn.Module):
  """Pre-activation residual block: (GroupNorm, swish, 3x3 conv) twice, 1x1 conv shortcut."""

  features: int
  num_groups: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = x
    for i in range(2):
      h = nn.swish(group_norm(h, self.num_groups, name=f'norm_{i}'))
      h = conv(h, self.features, 3, name=f'conv_{i}')
    if x.shape[-1] != self.features:
      x = conv(x, self.features, 1, name='shortcut')
    return x + h


def upsample_nearest(x: jax.Array, temporal: bool = False) -> jax.Array:
  """Doubles ``H`` and ``W`` of ``[B, (T,) H, W, C]`` by repeating pixels; ``temporal`` also
  takes ``1 + k`` frames to ``1 + 2k`` (each frame twice, then the first copy dropped), the
  inverse of a causal stride-2 downsampling."""
  x = jnp.repeat(jnp.repeat(x, 2, axis=-3), 2, axis=-2)
  return jnp.repeat(x, 2, axis=1)[:, 1:] if temporal else x


class Encoder(nn.Module):
  """``images [B, H, W, C]`` -> pre-quantization latents ``[B, H/f, W/f, embedding_dim]``."""

  config: TokenizerConfig

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    cfg = self.config
    channels = cfg.level_channels
    x = conv(images, channels[0], 3, name='conv_in')
    for level, features in enumerate(channels):
      for i in range(cfg.num_res_blocks):
        x = ResBlock(features, cfg.num_groups, name=f'level_{level}_block_{i}')(x)
      if level < len(channels) - 1:
        x = conv(x, features, 3, stride=2, temporal_stride=2 if _halves_time(cfg, level) else 1,
                 name=f'downsample_{level}')
    for i in range(cfg.num_res_blocks):
      x = ResBlock(channels[-1], cfg.num_groups, name=f'bottom_block_{i}')(x)
    x = nn.swish(group_norm(x, cfg.num_groups, name='norm_out'))
    return conv(x, cfg.embedding_dim, 1, name='conv_out')


class Decoder(nn.Module):
  """Mirror of ``Encoder``: latents ``[B, h, w, embedding_dim]`` -> images ``[B, fh, fw, C]``."""

  config: TokenizerConfig

  @nn.compact
  def __call__(self, latents: jax.Array) -> jax.Array:
    cfg = self.config
    channels = cfg.level_channels
    x = conv(latents, channels[-1], 3, name='conv_in')
    for i in range(cfg.num_res_blocks):
      x = ResBlock(channels[-1], cfg.num_groups, name=f'bottom_block_{i}')(x)
    for level in reversed(range(len(channels))):
      for i in range(cfg.num_res_blocks):
        x = ResBlock(channels[level], cfg.num_groups, name=f'level_{level}_block_{i}')(x)
      if level > 0:
        x = upsample_nearest(x, temporal=_halves_time(cfg, level - 1))
        x = conv(x, channels[level], 3, name=f'upsample_{level}')
    x = nn.swish(group_norm(x, cfg.num_groups, name='norm_out'))
    return conv(x, cfg.image_channels, 3, name='conv_out')


def _halves_time(cfg: TokenizerConfig, level: int) -> bool:
  return bool(cfg.temporal_downsample) and bool(cfg.temporal_downsample[level])


def nearest_codes(vectors: jax.Array, codebook: jax.Array) -> jax.Array:
  """Index of the L2-nearest row of ``codebook [K, D]`` for each row of ``vectors [N, D]``."""
  # |v|^2 is the same for every code, so it does not change the argmin. Full precision keeps
  # near-ties from flipping under reduced-precision matmuls on accelerators.
  cross = jnp.dot(vectors, codebook.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.argmin(jnp.sum(codebook ** 2, axis=-1) - 2 * cross, axis=-1).astype(jnp.int32)


def codebook_usage(ids: jax.Array, codebook_size: int) -> dict[str, jax.Array]:
  """``perplexity`` (exp of the entropy of the code histogram) and ``usage`` (fraction used)."""
  counts = jnp.bincount(ids.reshape(-1), length=codebook_size)
  probs = counts / ids.size
  entropy = -jnp.sum(jax.scipy.special.xlogy(probs, probs))
  return {'perplexity': jnp.exp(entropy), 'usage': jnp.mean(counts > 0)}


class VectorQuantizer(nn.Module):
  """Nearest-code lookup with a straight-through gradient.

  ``__call__(z)`` returns ``(quantized, ids, stats)``. ``quantized`` equals the chosen codes in
  the forward pass and hands its gradient to ``z`` unchanged; the codebook learns only from
  ``stats['codebook_loss']``. ``stats`` also holds the unweighted ``commitment_loss`` and the
  ``codebook_usage`` of the batch.
  """

  codebook_size: int
  embedding_dim: int

  def setup(self):
    self.codebook = self.param(
        'codebook', nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform'),
        (self.codebook_size, self.embedding_dim))

  def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    ids = nearest_codes(z.reshape(-1, self.embedding_dim), self.codebook).reshape(z.shape[:-1])
    q = self.lookup(ids)
    stats = {
        'codebook_loss': jnp.mean((jax.lax.stop_gradient(z) - q) ** 2),
        'commitment_loss': jnp.mean((z - jax.lax.stop_gradient(q)) ** 2),
        **codebook_usage(ids, self.codebook_size),
    }
    return z + jax.lax.stop_gradient(q - z), ids, stats

  def lookup(self, ids: jax.Array) -> jax.Array:
    """Codes of ``ids [...]`` as ``[..., embedding_dim]``."""
    return jnp.take(self.codebook, ids, axis=0)


class VQGAN(nn.Module):
  """Encoder, quantizer and decoder; ``init`` through ``__call__`` creates all parameters.

  ``encode`` sows the pre-quantization latents as ``intermediates/encodings``; apply with
  ``mutable=['intermediates']`` to get them for ``restart_dead_codes``. The codebook lives at
  ``params['quantizer']['codebook']``.
  """

  config: TokenizerConfig

  def setup(self):
    cfg = self.config
    cfg.validate()
    self.encoder = Encoder(cfg)
    self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.embedding_dim)
    self.decoder = Decoder(cfg)

  def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """``images [B, H, W, C]`` (or videos ``[B, T, H, W, C]``) -> ``(ids [B, h, w],
    quantized [B, h, w, D], stats)`` (``[B, t, h, w]`` ids for videos)."""
    self.config.latent_shape(*images.shape[1:-1])  # raises on sizes that do not fit
    z = self.encoder(images)
    self.sow('intermediates', 'encodings', z)
    quantized, ids, stats = self.quantizer(z)
    return ids, quantized, stats

  def decode_ids(self, ids: jax.Array) -> jax.Array:
    """``ids [B, (t,) h, w]`` -> images ``[B, fh, fw, C]`` or videos (unclipped)."""
    return self.decoder(self.quantizer.lookup(ids))

  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """``images`` -> ``(reconstruction, ids, stats)``; gradients pass straight through."""
    ids, quantized, stats = self.encode(images)
    return self.decoder(quantized), ids, stats


def tokenizer_loss(reconstruction: jax.Array, images: jax.Array, stats: dict[str, jax.Array],
                   commitment_cost: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L2 reconstruction + codebook loss + ``commitment_cost`` * commitment loss, and metrics."""
  mse = jnp.mean((reconstruction - images) ** 2)
  loss = mse + stats['codebook_loss'] + commitment_cost * stats['commitment_loss']
  metrics = {'reconstruction_mse': mse}
  metrics.update({k: stats[k] for k in ('codebook_loss', 'commitment_loss', 'perplexity',
                                        'usage')})
  return loss, metrics


def update_usage_ema(usage_ema: jax.Array, ids: jax.Array, codebook_size: int,
                     decay: float) -> jax.Array:
  """EMA of how many times per batch each code is picked; ``usage_ema [K]``."""
  counts = jnp.bincount(ids.reshape(-1), length=codebook_size).astype(usage_ema.dtype)
  return decay * usage_ema + (1.0 - decay) * counts


def restart_dead_codes(codebook: jax.Array, usage_ema: jax.Array, encodings_flat: jax.Array,
                       rng: jax.Array, threshold: float) -> jax.Array:
  """Replaces the codes whose ``usage_ema`` is below ``threshold`` by random batch encodings.

  Args:
    codebook: ``[K, D]``.
    usage_ema: ``[K]``, from ``update_usage_ema``.
    encodings_flat: ``[N, D]`` pre-quantization encoder outputs of the current batch.
    rng: picks the replacements; distinct rows when ``N >= K``.
    threshold: codes used less than this many times per batch (on average) are dead.

  Returns:
    The new codebook; live codes are unchanged. Restarted codes keep their low EMA, so reset it
    (e.g. to ``threshold``) unless the next call should be free to restart them again.
  """
  num_codes, num_rows = codebook.shape[0], encodings_flat.shape[0]
  picks = jax.random.choice(rng, num_rows, (num_codes,), replace=num_rows < num_codes)
  replacements = jax.lax.stop_gradient(encodings_flat[picks]).astype(codebook.dtype)
  return jnp.where((usage_ema < threshold)[:, None], replacements, codebook)


class PatchDiscriminator(nn.Module):
  """PatchGAN discriminator: stride-2 4x4 convs with leaky ReLU, one logit per patch.

  ``images [B, H, W, C]`` -> logits ``[B, ceil(H / 2**L), ceil(W / 2**L), 1]``; videos
  ``[B, T, H, W, C]`` get 4x4x4 convs (stride 2 in time too; ``conv3d.Conv3D``, the same
  parameters as ``nn.Conv``). GroupNorm (off with
  ``num_groups=None``) keeps images independent, as the per-image R1 penalty needs.
  """

  base_channels: int = 64
  num_layers: int = 3
  num_groups: Optional[int] = 8

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = images
    dims = images.ndim - 2
    conv_class = nn.Conv if dims == 2 else conv3d.Conv3D
    for i in range(self.num_layers):
      x = partitioning.constrain_batch(conv_class(
          self.base_channels * 2 ** min(i, 3), (4,) * dims, strides=(2,) * dims,
          name=f'conv_{i}')(x))
      if i > 0 and self.num_groups:
        x = nn.GroupNorm(self.num_groups, name=f'norm_{i}')(x)
      x = nn.leaky_relu(x, 0.2)
    return conv_class(1, (4,) * dims, name='logits')(x)


def discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
  """Non-saturating (logistic) loss: ``mean(softplus(-D(real))) + mean(softplus(D(fake)))``."""
  return jnp.mean(jax.nn.softplus(-real_logits)) + jnp.mean(jax.nn.softplus(fake_logits))


def generator_adversarial_loss(fake_logits: jax.Array) -> jax.Array:
  """Non-saturating generator loss ``mean(softplus(-D(fake)))``."""
  return jnp.mean(jax.nn.softplus(-fake_logits))


def r1_penalty(discriminator_apply_fn: Callable[..., jax.Array], params,
               real_images: jax.Array) -> jax.Array:
  """Mean over images of ``|d sum(D(x)) / dx|^2``, patch logits summed per image.

  ``discriminator_apply_fn(params, images)`` returns logits; the caller applies the usual
  ``gamma / 2`` weight. Differentiable in ``params``.
  """
  grads = jax.grad(lambda x: jnp.sum(discriminator_apply_fn(params, x)))(real_images)
  return jnp.mean(jnp.sum(grads ** 2, axis=tuple(range(1, grads.ndim))))
