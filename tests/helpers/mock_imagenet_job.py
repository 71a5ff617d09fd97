r"""``configs/imagenet256.py:tiny``, shrunk for tests, run over TFDS mock data in this process:

  python tests/helpers/mock_imagenet_job.py WORKDIR MODE...    # --modes, or train_tokens, in turn

(one of several JAX processes when ``JAX_COORDINATOR_ADDRESS`` and friends are set). The test
fixtures call ``run`` in-process.
"""

import os
import sys

import tensorflow_datasets as tfds

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # conftest
from conftest import load_config  # pylint: disable=wrong-import-position

NUM_EXAMPLES = 12  # per split of the mock imagenet2012


def tiny_config(data_dir: str):
  config = load_config('imagenet256', 'tiny')
  config.data.data_dir = data_dir
  config.model.num_layers = 1
  # What costs here is compiling, not running: a one-block tokenizer without the discriminator
  # (the adversarial loss is trained in tests/unit/training/test_tokenizer_training.py), and
  # cached steps padded to 4 query buckets, so that the decodes share a few programs.
  config.tokenizer.num_res_blocks = 1
  config.sampling.query_buckets = 4
  config.data.token_views = 2  # the center crop and one random crop of each training image
  config.tokenizer_training.update(num_steps=2, batch_size=4, log_every=1, checkpoint_every=2,
                                   adversarial_weight=0.0)
  config.training.update(num_steps=2, batch_size=4, log_every=1, checkpoint_every=2)
  config.eval.update(num_samples=NUM_EXAMPLES, batch_size=6, grid_per_class=1,
                     min_reference_images=NUM_EXAMPLES)
  for name in list(config.eval.schedules):
    if name != 'magnets':
      del config.eval.schedules[name]
  return config


TRAIN_TOKENS = 'train_tokens'  # not a job mode: only the encoding of the training split


def run(workdir: str, *modes: str):
  from nested_decode import main  # absl flags: imported only here
  config = tiny_config(os.path.join(os.path.dirname(workdir), 'tfds'))
  job = main.Run(config, 'configs/imagenet256.py:tiny', workdir)
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    for mode in modes:
      if mode == TRAIN_TOKENS:
        from nested_decode.pipeline import stages
        stages.token_dataset(config, workdir, 'train', job.mesh)
      else:
        main.run_mode(main.MODES[mode], job)
  return config


if __name__ == '__main__':
  from absl import logging

  from nested_decode import parallel
  logging.set_verbosity(logging.INFO)
  parallel.initialize_distributed()
  run(sys.argv[1], *sys.argv[2:])
