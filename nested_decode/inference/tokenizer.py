"""The VQ tokenizer at inference: uint8 pixels -> token ids and back, compiled once per
tokenizer, mesh and sharding rules; and how a config's data become the tokenizer's inputs
(training reads the same definitions)."""

import functools
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from nested_decode import parallel
from nested_decode.data import pixels
from nested_decode.models import vqgan


def tokenizer_config(config: ml_collections.ConfigDict) -> vqgan.TokenizerConfig:
  t = config.tokenizer
  return vqgan.TokenizerConfig(
      image_channels=config.data.channels, base_channels=t.base_channels,
      channel_multipliers=tuple(t.channel_multipliers), num_res_blocks=t.num_res_blocks,
      embedding_dim=t.embedding_dim, codebook_size=config.tokens.codebook_size,
      commitment_cost=t.commitment_cost, num_groups=t.num_groups,
      video=is_video(config), temporal_downsample=tuple(t.get('temporal_downsample', ())))


def is_video(config: ml_collections.ConfigDict) -> bool:
  return bool(config.data.get('num_frames'))


def example_shape(config: ml_collections.ConfigDict, num_frames: int) -> tuple[int, ...]:
  """The tokenizer's input shape of one example: ``(S, S, C)`` or ``(T', S, S, C)`` with
  ``T' = causal_frames(num_frames)``."""
  size, channels = config.data.image_size, config.data.channels
  if not is_video(config):
    return (size, size, channels)
  frames = vqgan.causal_frames(num_frames, tokenizer_config(config).temporal_factor)
  return (frames, size, size, channels)


def host_inputs(config: ml_collections.ConfigDict, batch: dict) -> np.ndarray:
  """A loader batch's uint8 ``image`` or ``video`` as the tokenizer's input (videos causally
  padded), still uint8 and in numpy, before the batch is split over the mesh; the jitted
  step scales it (``pixels.to_float``)."""
  if not is_video(config):
    return np.asarray(batch['image'])
  return vqgan.pad_to_causal(np.asarray(batch['video']),
                             tokenizer_config(config).temporal_factor)


@functools.cache
def _coder(tokenizer: vqgan.TokenizerConfig, mesh: Mesh, rules: parallel.Rules):
  """The compiled encode and decode, run with ``mesh`` as the context mesh (the model's
  sharding constraints keep the feature maps split over the batch)."""
  model = vqgan.VQGAN(tokenizer)
  encode = jax.jit(lambda p, x: model.apply(p, pixels.to_float(x), method=model.encode)[0])
  decode = jax.jit(lambda p, ids: model.apply(p, ids, method=model.decode_ids))
  return parallel.under_mesh(encode, mesh, rules), parallel.under_mesh(decode, mesh, rules)


def encode_batch(config: ml_collections.ConfigDict, params: Any, batch: dict, mesh: Mesh
                 ) -> np.ndarray:
  """A loader batch (uint8 images ``[b, H, W, C]`` or videos ``[b, T, H, W, C]``)
  -> token ids ``[b, N]``. On several processes each passes its own rows, as many as the
  others (the encode is one computation over ``mesh``, ``parallel.apply_to_local_rows``)."""
  encode, _ = _coder(tokenizer_config(config), mesh, parallel.logical_rules(config))
  inputs = host_inputs(config, batch)
  ids = parallel.apply_to_local_rows(lambda x: encode(params, x), mesh, inputs)
  return ids.reshape(len(inputs), -1)


def decode_tokens(config: ml_collections.ConfigDict, params: Any, tokens: np.ndarray, mesh: Mesh,
                  batch_size: int = 256) -> np.ndarray:
  """Token ids ``[n, N]`` -> uint8 images ``[n, H, W, C]`` or videos ``[n, T, H, W, C]`` (the
  causal padding frames dropped). On several processes each passes its own rows, as many as
  the others (see ``encode_batch``)."""
  _, decode = _coder(tokenizer_config(config), mesh, parallel.logical_rules(config))
  shape = tuple(config.tokens.shape)
  out = []
  for start in range(0, len(tokens), batch_size):
    ids = np.asarray(tokens[start:start + batch_size]).reshape((-1,) + shape)
    images = parallel.apply_to_local_rows(lambda x: decode(params, x), mesh, ids)
    if is_video(config):
      images = images[:, :config.data.num_frames]
    out.append(pixels.to_uint8(images))
  return np.concatenate(out)
