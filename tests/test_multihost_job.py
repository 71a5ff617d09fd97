"""The main job's stages split over two processes (2 CPU devices each, one JAX cluster over
localhost) give what one process on 4 devices gives: the same tokens, samples and eval.json,
with each process encoding and decoding half of the rows."""

import json
import re

import gcsfs
import numpy as np

from conftest import cpu_env, free_port, load_config, start_main
from nested_decode import io_utils
from nested_decode import stages

SCHEDULES = ('baseline', 'magnets', 'magnets_nocache', 'magnets_small_heavy')


def test_two_processes_split_encoding_sampling_and_eval(mnist_tiny_job, tmp_path):
  """Against the session's bucket job (one process, 4 devices): its trained stages are
  downloaded, and two processes run the eval stage from there in a local workdir."""
  reference = mnist_tiny_job.workdir
  workdir = tmp_path / 'run'
  bucket = gcsfs.GCSFileSystem()
  for trained in ('tokenizer', 'transformer', 'classifier'):  # the split stages start after
    bucket.get(f'{reference.removeprefix("gs://")}/{trained}', str(workdir / trained),
               recursive=True)
  address = f'127.0.0.1:{free_port()}'
  runs = [start_main('--config=configs/mnist.py:tiny', f'--workdir={workdir}', '--mode=eval',
                     env=cpu_env(2, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES='2',
                                 JAX_PROCESS_ID=str(i)))
          for i in range(2)]
  logs = []
  for run in runs:
    _, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr[-3000:]
    logs.append(stderr)

  assert json.loads((workdir / 'eval.json').read_text()) == json.loads(
      io_utils.read_text(io_utils.join(reference, 'eval.json')))
  for name in SCHEDULES:
    whole = io_utils.load_npz(io_utils.join(reference, 'samples', f'{name}.npz'))
    split = io_utils.load_npz(str(workdir / 'samples' / f'{name}.npz'))
    np.testing.assert_array_equal(split['images'], whole['images'])
    np.testing.assert_array_equal(split['labels'], whole['labels'])

  # Each process encoded its half of the held-out digits into its own file.
  files = stages.stored_token_shards(str(workdir), 'eval')
  assert [f.name for f in files] == ['eval-00000-of-00002.npz', 'eval-00001-of-00002.npz']
  halves = [np.load(f)['rows'] for f in files]
  assert [len(h) for h in halves] == [500, 500] and not set(halves[0]) & set(halves[1])
  config = load_config('mnist', 'tiny')
  split_tokens, _ = stages.token_dataset(config, str(workdir), 'eval')
  whole_tokens, _ = stages.token_dataset(config, reference, 'eval')
  np.testing.assert_array_equal(split_tokens, whole_tokens)

  # ... and decoded half of the samples of every schedule.
  for process, log in enumerate(logs):
    counts = re.findall(rf'Process {process} decoded (\d+) of (\d+) samples', log)
    assert counts and all(int(done) * 2 == int(total) for done, total in counts), counts
