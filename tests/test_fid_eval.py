"""The ImageNet job end to end on configs/imagenet256.py:tiny over TFDS mock data: FID per schedule."""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from nested_decode.evaluation import fid
from nested_decode.jobs import fid_eval
from nested_decode.jobs import stages

from conftest import load_config

NUM_EXAMPLES = 12  # per split of the mock imagenet2012


@pytest.fixture(scope='module')
def imagenet_job(tmp_path_factory):
  """The whole job (tokenizer, tokens, transformer, samples, FID) in this process."""
  from nested_decode import main  # absl flags: imported only here
  root = tmp_path_factory.mktemp('imagenet')
  config = load_config('imagenet256', 'tiny')
  config.data.data_dir = str(root / 'tfds')
  config.tokenizer_training.update(num_steps=2, batch_size=4, log_every=1, checkpoint_every=2)
  config.training.update(num_steps=2, batch_size=4, log_every=1, checkpoint_every=2)
  config.eval.update(num_samples=NUM_EXAMPLES, batch_size=6, grid_per_class=1,
                     min_reference_images=NUM_EXAMPLES)
  for name in list(config.eval.schedules):
    if name != 'magnets':
      del config.eval.schedules[name]
  workdir = str(root / 'run')
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    main.run_stages(config, 'configs/imagenet256.py:tiny', workdir, 'all')
    yield config, workdir


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


def test_resume_recomputes_only_the_missing_schedule(imagenet_job, monkeypatch):
  config, workdir = imagenet_job
  before = {row['schedule']: row['fid'] for row in read_report(workdir)['rows']}
  os.remove(fid_eval.statistics_path(workdir, 'magnets'))
  counting = CountingNetwork(fid_eval.network(config))
  monkeypatch.setattr(fid_eval, 'network', lambda config: counting)
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    rows = fid_eval.eval_stage(config, workdir)
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
  rows = fid_eval.eval_stage(config, workdir)
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
      fid_eval.reference_statistics(config, workdir, fid_eval.network(config))


def test_missing_inception_weights_stop_the_job_before_training(tmp_path):
  config = load_config('imagenet256')
  config.eval.inception_weights = str(tmp_path / 'pt_inception.pth')
  with pytest.raises(FileNotFoundError, match='config.eval.inception_weights=.*pt_inception'):
    stages.check_can_evaluate(config)
