"""The check every pretrained-network loader ends with: loaded arrays match the module exactly."""

import numpy as np


def check_matches(loaded: dict[tuple[str, ...], np.ndarray],
                  expected: dict[tuple[str, ...], tuple[int, ...]], description: str) -> None:
  """Raises ValueError naming what is missing, unused or of the wrong shape (at most 5 each)."""
  shapes = {k: tuple(v.shape) for k, v in loaded.items()}
  if shapes == expected:
    return
  missing = sorted('/'.join(k) for k in expected.keys() - shapes.keys())
  unused = sorted('/'.join(k) for k in shapes.keys() - expected.keys())
  wrong = sorted(f'{"/".join(k)} {shapes[k]} != {expected[k]}'
                 for k in expected.keys() & shapes.keys() if shapes[k] != expected[k])
  raise ValueError(f'{description}: missing {missing[:5]}, unused {unused[:5]}, wrong shapes '
                   f'{wrong[:5]}')
