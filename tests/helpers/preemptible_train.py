r"""A small real transformer training run for the fault tests, run as a subprocess:

  python tests/helpers/preemptible_train.py WORKDIR NUM_STEPS [SECONDS_PER_STEP [STALL_SAVE_AT]]

trains the nested transformer (2 x 64) on synthetic tokens through the shared loop, with a grain
loader whose position goes into the checkpoints (every 3 steps, metrics every step).
SECONDS_PER_STEP > 0 slows each batch down so a test can signal the run mid-way; STALL_SAVE_AT
makes the checkpoint write of that step hang half-way (after it wrote its items into orbax's
temporary folder, before the commit) and creates WORKDIR/STALLED, for a test to kill it there.
A preempted run prints the reason and exits with ``Preempted.exit_code``, as ``main`` does.
"""

import os
import sys
import time

import numpy as np
import orbax.checkpoint as ocp

from nested_decode import config_lib, parallel
from nested_decode.data import pipeline, sources
from nested_decode.training import loop, train_transformer

CHECKPOINT_EVERY = 3


def config(num_steps: int):
  config = config_lib.base_config(num_layers=2, width=64, num_heads=8, token_shape=(4, 4),
                                  codebook_size=16, num_classes=3, guidance_scale=1.0,
                                  batch_size=2)
  config.training = config_lib.training_config(
      num_steps=num_steps, batch_size=8, learning_rate=3e-3, warmup_steps=2, log_every=1,
      checkpoint_every=CHECKPOINT_EVERY)
  return config


def batches(seconds_per_step: float):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, 200).astype(np.int32)
  tokens = ((labels[:, None] * 5 + np.arange(16)[None]) % 16).astype(np.int32)
  source = pipeline.ArraySource('synthetic-tokens', tokens=tokens, label=labels)
  make_iterator, iterator_state = sources.resumable_batches(source, None, global_batch_size=8,
                                                          seed=0)

  class Slowed:
    def __init__(self, iterator):
      self.iterator = iterator

    def __next__(self):
      time.sleep(seconds_per_step)
      return next(self.iterator)

  return (lambda state: Slowed(make_iterator(state)),
          lambda slowed: iterator_state(slowed.iterator))


def stall_save(workdir: str, step: int) -> None:
  original = ocp.StandardCheckpointHandler.async_save

  async def stalled(self, directory, *args, **kwargs):
    futures = await original(self, directory, *args, **kwargs)
    if f'{step}.orbax-checkpoint-tmp' in str(directory):
      open(os.path.join(workdir, 'STALLED'), 'w').close()
      time.sleep(600)
    return futures

  ocp.StandardCheckpointHandler.async_save = stalled


def main(argv):
  workdir, num_steps = argv[1], int(argv[2])
  seconds_per_step = float(argv[3]) if len(argv) > 3 else 0.0
  if len(argv) > 4:
    stall_save(workdir, int(argv[4]))
  try:
    train_transformer.train(config(num_steps), workdir, *batches(seconds_per_step),
                            parallel.make_mesh(config(num_steps)))
  except loop.Preempted as error:
    print(f'Preempted: {error}', file=sys.stderr, flush=True)
    sys.exit(error.exit_code)


if __name__ == '__main__':
  main(sys.argv)
