"""The ImageNet job end to end on configs/imagenet256.py:tiny over TFDS mock data: FID per
schedule."""

import copy
import json
import os
import shutil
import subprocess
import sys

import mock_imagenet_job
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import HELPERS, cpu_env, free_port, load_config
from mock_imagenet_job import NUM_EXAMPLES

from nested_decode import parallel
from nested_decode.config_lib import ConfigError
from nested_decode.metrics import fid
from nested_decode.pipeline import fid_eval, stages


@pytest.fixture(scope='module')
def imagenet_job(tmp_path_factory):
  """The whole job (tokenizer, tokens, transformer, samples, FID) in this process."""
  workdir = str(tmp_path_factory.mktemp('imagenet') / 'run')
  config = mock_imagenet_job.run(workdir, 'all')
  yield config, workdir


@pytest.fixture(scope='module')
def two_process_run(imagenet_job, tmp_path_factory):
  """The job's trained tokenizer and transformer, and its finished magnets and reference
  statistics, copied to a new workdir where two JAX processes of one device each encode the
  training split (both views) and then run the eval: the baseline's samples, the eval split's
  tokens and the tokenizer's reconstructions are computed again there, split over the two."""
  _, reference = imagenet_job
  workdir = tmp_path_factory.mktemp('two_processes') / 'run'
  for kept in ('tokenizer', 'transformer'):
    shutil.copytree(os.path.join(reference, kept), workdir / kept)
  (workdir / 'samples').mkdir()
  for name in ('reference_validation', 'magnets'):
    path = fid_eval.statistics_path(reference, name)
    shutil.copy(path, workdir / 'samples' / os.path.basename(path))
  address = f'127.0.0.1:{free_port()}'
  # Logs go to files: a process blocked on a full pipe would stall the other at a barrier.
  logs = [workdir.parent / f'process{i}.log' for i in range(2)]
  runs = []
  for i, log in enumerate(logs):
    with open(log, 'w') as stderr:
      runs.append(subprocess.Popen(
          [sys.executable, os.path.join(HELPERS, 'mock_imagenet_job.py'), str(workdir),
           mock_imagenet_job.TRAIN_TOKENS, 'eval'],
          env=cpu_env(1, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES='2',
                      JAX_PROCESS_ID=str(i)),
          stdout=subprocess.DEVNULL, stderr=stderr))
  for run, log in zip(runs, logs):
    run.wait(timeout=600)
    assert run.returncode == 0, log.read_text()[-3000:]
  return workdir


def read_report(workdir):
  with open(os.path.join(workdir, 'eval.json')) as f:
    return json.load(f)


def test_eval_json_has_fid_and_flops_per_schedule(imagenet_job):
  config, workdir = imagenet_job
  report = read_report(workdir)
  rows = {row['schedule']: row for row in report['rows']}
  assert set(rows) == {'baseline', 'magnets'}
  for row in rows.values():
    assert np.isfinite(row['fid']) and row['fid'] > 0
    assert row['num_samples'] == NUM_EXAMPLES and row['gflops_per_sample'] > 0
    assert row['inception_score'] is None  # the FID weights have no classifier head
  assert rows['baseline']['flop_ratio'] == 1.0 and rows['magnets']['flop_ratio'] > 1.5
  assert report['reference'] == {'source': 'imagenet2012 validation', 'num_images': NUM_EXAMPLES}
  ceiling = report['tokenizer_reconstructions_of_held_out']
  assert np.isfinite(ceiling['fid']) and ceiling['num_images'] == NUM_EXAMPLES
  assert 'pt_inception' in report['inception_score_needs']
  for name in ('baseline', 'magnets'):
    assert os.path.getsize(os.path.join(workdir, 'samples', f'{name}.png')) > 0


class CountingNetwork:
  def __init__(self, net):
    self.net, self.images = net, 0
    self.has_head, self.batch_size = net.has_head, net.batch_size

  def __call__(self, images):
    self.images += len(images)
    return self.net(images)


def test_the_transformer_trained_on_two_views_of_each_training_image(imagenet_job):
  """View 0 is the center crop the held-out images get, view 1 a random crop and flip drawn
  from (seed, view, example): the tokens differ, and the transformer read both."""
  config, workdir = imagenet_job
  (file,) = stages.stored_token_shards(workdir, 'train')
  stored = np.load(file)
  assert sorted(zip(stored['rows'], stored['views'])) == [
      (row, view) for row in range(NUM_EXAMPLES) for view in (0, 1)]
  tokens, labels = stages.token_dataset(config, workdir, 'train', parallel.make_mesh(config))
  assert tokens.shape == (2 * NUM_EXAMPLES, 256) and len(labels) == 2 * NUM_EXAMPLES
  center, random_crop = tokens[0::2], tokens[1::2]
  assert np.mean(center != random_crop) > 0.5
  np.testing.assert_array_equal(labels[0::2], labels[1::2])
  wrong = copy.deepcopy(config)
  wrong.data.token_views = 3
  with pytest.raises(ConfigError, match=r'config\.data\.token_views=3 .* hold 2 view'):
    stages.token_dataset(wrong, workdir, 'train', parallel.make_mesh(wrong))


def test_two_processes_encode_the_views_one_process_encodes(imagenet_job, two_process_run):
  """Each process encodes its half of the training images in both views into its own file;
  read together they are the one-process tokens (a view's randomness is the example's)."""
  config, reference = imagenet_job
  workdir = two_process_run
  files = stages.stored_token_shards(str(workdir), 'train')
  assert [f.name for f in files] == ['train-00000-of-00002.npz', 'train-00001-of-00002.npz']
  halves = [set(np.load(f)['rows'].tolist()) for f in files]
  assert not halves[0] & halves[1] and len(halves[0] | halves[1]) == NUM_EXAMPLES
  mesh = parallel.make_mesh(config)
  split, split_labels = stages.token_dataset(config, str(workdir), 'train', mesh)
  whole, whole_labels = stages.token_dataset(config, reference, 'train', mesh)
  np.testing.assert_array_equal(split, whole)
  np.testing.assert_array_equal(split_labels, whole_labels)


def test_resume_recomputes_only_the_missing_schedule(imagenet_job, monkeypatch):
  config, workdir = imagenet_job
  before = {row['schedule']: row['fid'] for row in read_report(workdir)['rows']}
  os.remove(fid_eval.statistics_path(workdir, 'magnets'))
  counting = CountingNetwork(fid_eval.network(config))
  monkeypatch.setattr(fid_eval, 'network', lambda config: counting)
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    rows = fid_eval.eval_stage(config, workdir, parallel.make_mesh(config))
  assert counting.images == NUM_EXAMPLES  # magnets' samples only: the rest was read back
  assert {row['schedule']: row['fid'] for row in rows} == pytest.approx(before, rel=1e-9)


def test_an_adm_reference_batch_gives_the_same_fid(imagenet_job, tmp_path):
  config, workdir = imagenet_job
  before = {row['schedule']: row['fid'] for row in read_report(workdir)['rows']}
  reference = fid.ImageStatistics.load(
      fid_eval.statistics_path(workdir, 'reference_validation'))
  mu, sigma = reference.fid_statistics()
  np.savez(tmp_path / 'VIRTUAL_reference.npz', mu=mu, sigma=sigma)
  config = config.copy_and_resolve_references()
  config.eval.fid_reference = str(tmp_path / 'VIRTUAL_reference.npz')
  rows = fid_eval.eval_stage(config, workdir, parallel.make_mesh(config))
  assert {row['schedule']: row['fid'] for row in rows} == pytest.approx(before, rel=1e-9)
  assert read_report(workdir)['reference']['num_images'] is None


def test_too_few_reference_images_is_an_error(imagenet_job):
  config, workdir = imagenet_job
  config = config.copy_and_resolve_references()
  config.eval.fid_reference = 'train'
  config.eval.min_reference_images = NUM_EXAMPLES + 1
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    with pytest.raises(fid.ReferenceError, match=f"split 'train' has {NUM_EXAMPLES} reference "
                       f'images; the protocol needs at least {NUM_EXAMPLES + 1}'):
      fid_eval.reference_statistics(config, workdir, parallel.make_mesh(config),
                                    fid_eval.network(config))


def test_missing_inception_weights_stop_the_job_before_training(tmp_path):
  config = load_config('imagenet256')
  config.eval.inception_weights = str(tmp_path / 'pt_inception.pth')
  with pytest.raises(FileNotFoundError, match='config.eval.inception_weights=.*pt_inception'):
    stages.check_can_evaluate(config)


def test_two_processes_give_the_fids_of_one(imagenet_job, two_process_run):
  """The eval split over two processes (one device each): each decodes its half of every
  baseline batch and puts it through Inception; the gathered statistics give the one-process
  FIDs (magnets' statistics were copied, so its row is read back)."""
  _, reference = imagenet_job
  workdir = two_process_run
  one, two = read_report(reference), read_report(str(workdir))
  assert [r['fid'] for r in two['rows']] == pytest.approx([r['fid'] for r in one['rows']],
                                                          rel=1e-4)
  assert two['tokenizer_reconstructions_of_held_out']['fid'] == pytest.approx(
      one['tokenizer_reconstructions_of_held_out']['fid'], rel=1e-4)

