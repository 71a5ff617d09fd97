"""A small MNIST CNN, trained in-project, that scores generated digits.

It gives two numbers for class-conditional samples: how often the classifier agrees with the
class the sample was asked for, and the Fréchet distance between its penultimate (128-d)
features of the samples and of real held-out digits (an MNIST analogue of FID).

Images are uint8 ``[N, H, W, 1]``. The network sees 28x28: other sizes are center-cropped or
padded with background to 28x28, which exactly undoes the usual 2-pixel padding to 32x32.
Digits drawn at another scale must be resized by the caller.
"""

from typing import Callable

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from nested_decode import io_utils
from nested_decode.data import pixels
from nested_decode.metrics import frechet

SIZE = 28
NUM_CLASSES = 10
FEATURE_DIM = 128
MAX_SHIFT = 2


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max pooling of ``x [B, H, W, C]`` with even ``H, W``.

  Same values as ``nn.max_pool``, but its gradient is a plain reduction instead of XLA's
  select-and-scatter, which makes a CPU training step about 2.5x faster.
  """
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class DigitClassifier(nn.Module):
  """conv 32 -> pool -> conv 64 -> pool -> dense 128 (features) -> dense 10."""

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns ``(logits [B, 10], features [B, 128])`` for ``images [B, 28, 28, 1]`` in [-1, 1]."""
    x = images
    for channels in (32, 64):
      x = max_pool_2x2(nn.relu(nn.Conv(channels, (3, 3))(x)))
    features = nn.relu(nn.Dense(FEATURE_DIM)(x.reshape(x.shape[0], -1)))
    return nn.Dense(NUM_CLASSES)(features), features


def to_network_input(images: jax.Array) -> jax.Array:
  """uint8 ``[B, H, W, 1]`` -> float ``[B, 28, 28, 1]`` in [-1, 1], center-cropped or padded."""
  if images.dtype != jnp.uint8 or images.ndim != 4 or images.shape[-1] != 1:
    raise ValueError(f'expected uint8 images [N, H, W, 1], got {images.dtype} {images.shape}')
  x = pixels.to_float(images)
  for axis in (1, 2):
    excess = x.shape[axis] - SIZE
    if excess > 0:
      x = jax.lax.slice_in_dim(x, excess // 2, excess // 2 + SIZE, axis=axis)
    elif excess < 0:
      pad = [(0, 0)] * 4
      pad[axis] = (-excess // 2, -excess - (-excess // 2))  # the odd pixel goes after
      x = jnp.pad(x, pad, constant_values=-1)
  return x


def random_shift(rng: jax.Array, x: jax.Array) -> jax.Array:
  """Shifts each image of ``x [B, 28, 28, 1]`` by up to ``MAX_SHIFT`` pixels each way."""
  padded = jnp.pad(x, ((0, 0), (MAX_SHIFT, MAX_SHIFT), (MAX_SHIFT, MAX_SHIFT), (0, 0)),
                   constant_values=-1)
  offsets = jax.random.randint(rng, (x.shape[0], 2), 0, 2 * MAX_SHIFT + 1)
  crop = lambda image, offset: jax.lax.dynamic_slice(image, (offset[0], offset[1], 0),
                                                     (SIZE, SIZE, 1))
  return jax.vmap(crop)(padded, offsets)


def train_classifier(images: np.ndarray, labels: np.ndarray, *, steps: int = 500,
                     batch_size: int = 128, learning_rate: float = 3e-3, seed: int = 0,
                     log: Callable[[str], None] = print):
  """Trains ``DigitClassifier`` with Adam (cosine decay) on shifted digits; returns its params."""
  images, labels = np.asarray(images), np.asarray(labels, np.int32)
  if images.shape[0] != labels.shape[0]:
    raise ValueError(f'{images.shape[0]} images but {labels.shape[0]} labels')
  model = DigitClassifier()
  rng, init_rng = jax.random.split(jax.random.key(seed))
  params = model.init(init_rng, jnp.zeros((1, SIZE, SIZE, 1)))
  optimizer = optax.adam(optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, warmup_steps=min(50, steps // 10), decay_steps=steps))
  opt_state = optimizer.init(params)

  @jax.jit
  def train_step(params, opt_state, batch_images, batch_labels, step_rng):
    x = random_shift(step_rng, to_network_input(batch_images))

    def loss_fn(params):
      logits, _ = model.apply(params, x)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch_labels).mean()
      return loss, (logits.argmax(-1) == batch_labels).mean()

    (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, accuracy

  order_rng = np.random.default_rng(seed)
  order = np.empty(0, np.int64)
  for step in range(steps):
    if order.size < batch_size:
      order = np.concatenate([order, order_rng.permutation(images.shape[0])])
    batch, order = order[:batch_size], order[batch_size:]
    rng, step_rng = jax.random.split(rng)
    params, opt_state, loss, accuracy = train_step(params, opt_state, images[batch],
                                                   labels[batch], step_rng)
    if (step + 1) % 100 == 0 or step + 1 == steps:
      log(f'classifier step {step + 1}/{steps}: loss {float(loss):.4f}, '
          f'batch accuracy {float(accuracy):.3f}')
  return params


def save_classifier(path: str, params) -> None:
  io_utils.write_bytes(path, flax.serialization.to_bytes(params))


def load_classifier(path: str):
  template = DigitClassifier().init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 1)))
  return flax.serialization.from_bytes(template, io_utils.read_bytes(path))


@jax.jit
def _logits_and_features(params, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  return DigitClassifier().apply(params, to_network_input(images))


class ClassifierScorer:
  """Batched, jitted inference; batches are padded to one size so each shape compiles once."""

  def __init__(self, params, batch_size: int = 500):
    self.params = params
    self.batch_size = batch_size

  def logits_and_features(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logits ``[n, 10]`` and penultimate features ``[n, 128]`` of uint8 ``images``."""
    images = np.asarray(images)
    logits, features = [], []
    for start in range(0, images.shape[0], self.batch_size):
      batch = images[start:start + self.batch_size]
      padded = np.pad(batch, [(0, self.batch_size - batch.shape[0])] + [(0, 0)] * 3)
      batch_logits, batch_features = _logits_and_features(self.params, padded)
      logits.append(np.asarray(batch_logits)[:batch.shape[0]])
      features.append(np.asarray(batch_features)[:batch.shape[0]])
    return np.concatenate(logits), np.concatenate(features)

  def predict(self, images: np.ndarray) -> np.ndarray:
    """Predicted class ``[n]`` (int32) of uint8 ``images [n, H, W, 1]``."""
    return self.logits_and_features(images)[0].argmax(-1).astype(np.int32)

  def features(self, images: np.ndarray) -> np.ndarray:
    """Penultimate activations ``[n, 128]`` (float32) of uint8 ``images [n, H, W, 1]``."""
    return self.logits_and_features(images)[1]


def class_accuracy(predicted: np.ndarray, wanted: np.ndarray) -> float:
  """Fraction of samples whose predicted class is the one they were generated for."""
  predicted, wanted = np.asarray(predicted), np.asarray(wanted)
  if predicted.shape != wanted.shape:
    raise ValueError(f'shapes differ: {predicted.shape} vs {wanted.shape}')
  return float((predicted == wanted).mean())


class SampleScorer:
  """Scores sample sets against fixed reference digits, whose statistics are computed once."""

  def __init__(self, params, reference_images: np.ndarray):
    self.classifier = ClassifierScorer(params)
    self._reference = frechet.feature_statistics(self.classifier.features(reference_images))

  def score(self, sample_images: np.ndarray, sample_labels: np.ndarray) -> dict[str, float]:
    """Class accuracy of the samples and the Fréchet distance of their features."""
    correct, fd = self.correct_and_fd(sample_images, sample_labels)
    return dict(class_accuracy=float(correct.mean()), fd=fd)

  def correct_and_fd(self, sample_images: np.ndarray, sample_labels: np.ndarray
                     ) -> tuple[np.ndarray, float]:
    """Whether each sample is classified as its label (bool ``[n]``, for paired comparisons)
    and the Fréchet distance of the samples' features."""
    logits, features = self.classifier.logits_and_features(sample_images)
    predicted, wanted = logits.argmax(-1), np.asarray(sample_labels)
    if predicted.shape != wanted.shape:
      raise ValueError(f'{len(predicted)} samples but labels of shape {wanted.shape}')
    fd = frechet.frechet_distance(*frechet.feature_statistics(features), *self._reference)
    return predicted == wanted, fd


def score_samples(params, sample_images: np.ndarray, sample_labels: np.ndarray,
                  reference_images: np.ndarray) -> dict[str, float]:
  """Class accuracy of samples and Fréchet distance of their features to reference digits."""
  return SampleScorer(params, reference_images).score(sample_images, sample_labels)
