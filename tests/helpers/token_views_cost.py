r"""What ``config.data.token_views`` costs: storage and encoding time of the training tokens of
``configs/imagenet256.py:tiny`` over TFDS mock data, in 1 and in 10 views (docs/real_data.md):

  python tests/helpers/token_views_cost.py WORKDIR
"""

import json
import os
import shutil
import sys
import time

import tensorflow_datasets as tfds

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # conftest
from conftest import load_config  # pylint: disable=wrong-import-position

from nested_decode import parallel  # pylint: disable=wrong-import-position
from nested_decode.pipeline import stages  # pylint: disable=wrong-import-position

NUM_EXAMPLES = 100


def main(root: str) -> None:
  results = {}
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    for views in (1, 10):
      config = load_config('imagenet256', 'tiny')
      config.data.update(data_dir=os.path.join(root, 'tfds'), token_views=views, worker_count=0)
      config.tokenizer_training.update(num_steps=2, batch_size=4, checkpoint_every=2)
      workdir = os.path.join(root, f'views{views}')
      if views > 1:  # the same tokenizer
        shutil.copytree(os.path.join(root, 'views1', 'tokenizer'),
                        os.path.join(workdir, 'tokenizer'))
      mesh = parallel.make_mesh(config)
      stages.tokenizer_stage(config, workdir, mesh)
      began = time.perf_counter()
      tokens, _ = stages.token_dataset(config, workdir, 'train', mesh)
      seconds = time.perf_counter() - began
      (file,) = stages.stored_token_shards(workdir, 'train')
      results[views] = dict(rows=len(tokens), encode_seconds=round(seconds, 1),
                            bytes_per_image=os.path.getsize(file) / NUM_EXAMPLES)
  print(json.dumps(results, indent=1))


if __name__ == '__main__':
  main(sys.argv[1])
