"""Tasks say which tokens are given and which are generated; the model does not know about them.

- ``class_conditional`` (images, UCF101): every token is generated, the class token conditions.
- ``frame_prediction`` (Kinetics-600 protocol): the first ``condition_frames`` frames of a clip
  are given. With the causal video tokenizer (``models/vqgan.py``) the first
  ``1 + (condition_frames - 1) / t`` latent frames encode exactly those frames and nothing later
  (``t`` its temporal factor; 5 frames -> 2 latent frames at ``t = 4``), so their tokens are
  the sampler's known tokens: computed once from the real condition, never changed, and kept out
  of the training loss. The clip's other latent frames are generated.

Tokens are flattened in ``config.tokens.shape`` order: for videos ``(t, h, w)``, time first.
"""

import dataclasses
import math

import ml_collections
import numpy as np

from nested_decode.models import vqgan

TASKS = ('class_conditional', 'frame_prediction')


class LabelError(ValueError):
  """The data's labels do not fit ``config.tokens.num_classes``."""


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  token_shape: tuple[int, ...]
  given_latent_frames: int = 0  # frame prediction: leading latent frames that are given

  @property
  def seq_len(self) -> int:
    return math.prod(self.token_shape)

  @property
  def num_given(self) -> int:
    return self.given_latent_frames * math.prod(self.token_shape[1:])

  @property
  def num_generated(self) -> int:
    return self.seq_len - self.num_given

  def given_mask(self) -> np.ndarray:
    """Boolean ``[seq_len]``: True where the task gives the token."""
    return np.arange(self.seq_len) < self.num_given

  def initial_tokens(self, tokens: np.ndarray, mask_id: int) -> np.ndarray:
    """The decode's start: ``tokens [B, seq_len]`` at given positions, ``mask_id`` elsewhere."""
    return np.where(self.given_mask(), tokens, mask_id).astype(np.int32)


def given_latent_frames(condition_frames: int, temporal_factor: int) -> int:
  """Latent frames of a causal tokenizer that cover exactly the first ``condition_frames``."""
  if condition_frames < 1 or (condition_frames - 1) % temporal_factor:
    raise ValueError(f'{condition_frames} condition frames are not 1 + {temporal_factor}*k, so '
                     f'no latent frames of the causal tokenizer cover exactly them')
  return 1 + (condition_frames - 1) // temporal_factor


def task_of(config: ml_collections.ConfigDict) -> Task:
  """The task of ``config.task`` (class-conditional when the config has none)."""
  shape = tuple(int(s) for s in config.tokens.shape)
  task = config.get('task')
  name = task.name if task is not None else 'class_conditional'
  if name == 'class_conditional':
    return Task(name, shape)
  if name == 'frame_prediction':
    factor = vqgan.temporal_factor(config.tokenizer.temporal_downsample)
    return Task(name, shape, given_latent_frames(task.condition_frames, factor))
  raise ValueError(f'config.task.name={name!r} is invalid: allowed values are {TASKS}')


def conditioning_labels(labels: np.ndarray, num_classes: int, source: str) -> np.ndarray:
  """The class ids the model is conditioned on for examples with the data's ``labels``.

  Without classes (``num_classes == 0``) every example gets the unconditional id (0), whatever
  the data says: Kinetics clips carry their class index, but frame prediction is unconditional.
  Otherwise every label must be in ``[0, num_classes)``: a label past the class table would
  embed as NaN. ``source`` names the data in the error.
  """
  labels = np.asarray(labels, np.int32)
  if num_classes == 0:
    return np.zeros_like(labels)
  bad = labels[(labels < 0) | (labels >= num_classes)]
  if bad.size:
    raise LabelError(f'{source} has label {int(bad[0])} ({bad.size} of {labels.size} out of '
                     f'range), but config.tokens.num_classes={num_classes} allows 0..'
                     f'{num_classes - 1}; set config.tokens.num_classes to the number of '
                     'classes of the data (0 for an unconditional model)')
  return labels
