"""FID and Inception Score of image sets, streamed: memory does not grow with the number of images.

- FID: the squared Fréchet distance (``frechet.py``) between Gaussians fitted to the 2048-d pool
  features of ``inception.InceptionV3`` of two image sets.
- Inception Score (Salimans et al., 2016): ``exp(E_x KL(p(y|x) || p(y)))`` over the 1008-way
  softmax, computed on each of 10 consecutive splits of the samples; reported as the mean and
  standard deviation over splits, as the reference code does. Needs the classifier head
  (pytorch-fid's weights); the FID file ends at the pool.

``ImageStatistics`` accumulates both from batches (the sum and the sum of outer products of the
features in float64; per split, the summed probabilities and the summed ``sum_y p log p``) and
saves to and loads from one ``.npz``. Reference statistics come from images or from a reference
batch in the format of ADM's evaluator (``VIRTUAL_imagenet256_labeled.npz``: ``mu`` and
``sigma`` of the pool features, or images in ``arr_0``).
"""

import functools

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from nested_decode import io_utils
from nested_decode.metrics import frechet
from nested_decode.networks import compiled, inception

IS_SPLITS = 10


class ReferenceError(ValueError):
  """A reference file or image set that cannot serve as FID reference; the message says why."""


class InceptionNetwork:
  """Pool features (and logits, with the head) of uint8 images, each batch split over this
  process's devices (the weights replicated on each).

  Batches are padded to one size (a multiple of the local device count), so each image shape
  compiles once.
  """

  def __init__(self, variables=None, batch_size: int = 50):
    variables = variables if variables is not None else inception.load_variables()
    self.has_head = inception.has_head(variables)
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ('batch',))
    self._batch_sharding = NamedSharding(mesh, PartitionSpec('batch'))
    self.variables = jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))
    self.batch_size = batch_size
    model = inception.InceptionV3(head=self.has_head)
    self._apply = compiled.CompiledPerShape(
        lambda variables, images: model.apply(variables, inception.preprocess(images)))

  def __call__(self, images) -> dict[str, np.ndarray]:
    """``{'pool': float32 [N, 2048]}`` plus ``'logits' [N, 1008]`` with the head."""
    images = inception.check_images(images)
    devices = jax.local_device_count()
    size = -(-min(self.batch_size, len(images)) // devices) * devices
    outputs = []
    for start in range(0, len(images), size):
      batch = images[start:start + size]
      padded = jax.device_put(np.pad(batch, [(0, size - len(batch))] + [(0, 0)] * 3),
                              self._batch_sharding)
      outputs.append({k: np.asarray(v)[:len(batch)]
                      for k, v in self._apply(self.variables, padded).items()})
    return {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}


@functools.cache
def network(weights: str | None = None) -> InceptionNetwork:
  """One shared network per weights file (default: the fetched FID weights)."""
  return InceptionNetwork(inception.load_variables(weights or None))


class ImageStatistics:
  """Streaming FID moments and Inception Score splits of one set of ``total`` images.

  Images must arrive in order (the score's splits are consecutive ranges of indices).
  """

  def __init__(self, total: int, splits: int = IS_SPLITS):
    if total < 1:
      raise ValueError(f'an image set needs at least one image, got total={total}')
    self.total, self.splits = total, splits
    self.count = 0
    self.feature_sum = np.zeros(inception.FEATURE_DIM, np.float64)
    self.outer_sum = np.zeros((inception.FEATURE_DIM,) * 2, np.float64)
    self.probability_sums = np.zeros((splits, inception.NUM_CLASSES), np.float64)
    self.negentropy_sums = np.zeros(splits, np.float64)  # sum over x of sum_y p log p
    self.split_counts = np.zeros(splits, np.int64)
    self.has_logits = None

  def add(self, outputs: dict[str, np.ndarray]) -> None:
    """Adds the next images' ``InceptionNetwork`` outputs."""
    pool = np.asarray(outputs['pool'], np.float64)
    n = len(pool)
    if self.count + n > self.total:
      raise ValueError(f'{self.count + n} images added to statistics of {self.total}')
    has_logits = 'logits' in outputs
    if self.has_logits not in (None, has_logits):
      raise ValueError('some batches have logits and others do not')
    self.has_logits = has_logits
    self.feature_sum += pool.sum(axis=0)
    self.outer_sum += pool.T @ pool
    if has_logits:
      logits = np.asarray(outputs['logits'], np.float64)
      log_p = logits - logits.max(axis=1, keepdims=True)
      log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
      p = np.exp(log_p)
      split = (self.count + np.arange(n)) * self.splits // self.total
      np.add.at(self.probability_sums, split, p)
      np.add.at(self.negentropy_sums, split, (p * log_p).sum(axis=1))
      np.add.at(self.split_counts, split, 1)
    self.count += n

  def fid_statistics(self) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[2048]`` and unbiased covariance ``[2048, 2048]`` of the pool features."""
    if self.count < 2:
      raise ValueError(f'FID statistics need at least 2 images, have {self.count}')
    mu = self.feature_sum / self.count
    sigma = (self.outer_sum - self.count * np.outer(mu, mu)) / (self.count - 1)
    return mu, sigma

  def inception_score(self) -> tuple[float, float]:
    """Mean and standard deviation over the splits of ``exp(E KL(p(y|x) || p(y)))``."""
    if not self.has_logits:
      raise ValueError('the Inception Score needs the classifier head: load pytorch-fid\'s '
                       'pt_inception-2015-12-05 weights (config.eval.inception_weights)')
    if self.count != self.total or np.any(self.split_counts == 0):
      raise ValueError(f'the Inception Score needs all {self.total} images in {self.splits} '
                       f'non-empty splits, have {self.count}')
    marginal = self.probability_sums / self.split_counts[:, None]
    cross = (marginal * np.log(np.maximum(marginal, 1e-30))).sum(axis=1)  # E_x sum p log p(y)
    kl = self.negentropy_sums / self.split_counts - cross
    scores = np.exp(kl)
    return float(scores.mean()), float(scores.std())

  def state(self) -> dict[str, np.ndarray]:
    return dict(total=np.int64(self.total), splits=np.int64(self.splits),
                count=np.int64(self.count), feature_sum=self.feature_sum,
                outer_sum=self.outer_sum, probability_sums=self.probability_sums,
                negentropy_sums=self.negentropy_sums, split_counts=self.split_counts,
                has_logits=np.int8(-1 if self.has_logits is None else self.has_logits))

  def save(self, path: str) -> None:
    io_utils.write_npz(path, **self.state())

  @classmethod
  def load(cls, path: str) -> 'ImageStatistics':
    state = io_utils.load_npz(path)
    stats = cls(int(state['total']), int(state['splits']))
    stats.count = int(state['count'])
    for key in ('feature_sum', 'outer_sum', 'probability_sums', 'negentropy_sums',
                'split_counts'):
      setattr(stats, key, state[key])
    has_logits = int(state['has_logits'])
    stats.has_logits = None if has_logits < 0 else bool(has_logits)
    return stats


def statistics_of(images: np.ndarray, net: InceptionNetwork | None = None,
                  splits: int = IS_SPLITS) -> ImageStatistics:
  """``ImageStatistics`` of uint8 ``images [N, H, W, C]`` held in memory."""
  images = inception.check_images(images)
  net = net or network()
  stats = ImageStatistics(len(images), splits)
  for start in range(0, len(images), net.batch_size):
    stats.add(net(images[start:start + net.batch_size]))
  return stats


def fid(samples: ImageStatistics, reference: tuple[np.ndarray, np.ndarray]) -> float:
  """FID of ``samples`` against reference ``(mu, sigma)``."""
  return frechet.frechet_distance(*samples.fid_statistics(), *reference)


def read_reference_batch(path: str, min_images: int, net: InceptionNetwork | None = None
                         ) -> tuple[tuple[np.ndarray, np.ndarray], int | None]:
  """``((mu, sigma), number of images or None)`` from an ADM-format reference batch ``.npz``.

  ``mu [2048]`` and ``sigma [2048, 2048]`` are used as stored (their image count is unknown);
  otherwise the uint8 images ``arr_0 [N, H, W, 3]`` go through Inception, and fewer than
  ``min_images`` is an error.
  """
  try:
    arrays = io_utils.load_npz(path)
  except (OSError, ValueError) as e:
    raise ReferenceError(f'{path}: not a readable .npz reference batch ({e})') from e
  if 'mu' in arrays and 'sigma' in arrays:
    mu, sigma = np.asarray(arrays['mu'], np.float64), np.asarray(arrays['sigma'], np.float64)
    dim = inception.FEATURE_DIM
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
      raise ReferenceError(f'{path}: mu {mu.shape} and sigma {sigma.shape} are not the '
                           f'[{dim}] and [{dim}, {dim}] statistics of Inception pool features')
    return (mu, sigma), None
  if 'arr_0' not in arrays:
    raise ReferenceError(f'{path}: an ADM reference batch holds mu and sigma, or images in '
                         f'arr_0; found {sorted(arrays)}')
  images = arrays['arr_0']
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ReferenceError(f'{path}: arr_0 must be uint8 images [N, H, W, 3], got {images.dtype} '
                         f'{images.shape}')
  check_reference_count(len(images), min_images, path)
  return statistics_of(images, net).fid_statistics(), len(images)


def check_reference_count(count: int, min_images: int, what: str) -> None:
  if count < min_images:
    raise ReferenceError(f'{what} has {count} reference images; the protocol needs at least '
                         f'{min_images} (config.eval.min_reference_images)')
