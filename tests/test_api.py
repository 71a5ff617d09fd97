"""The Python API (``nested_decode.api``): it loads what the job trained and decodes exactly
what the job decodes; a recorded decode shows each step; bad input gets one clear error."""

import json

import numpy as np
import pytest

from conftest import load_config
from nested_decode import api
from nested_decode import config_lib
from nested_decode import tasks
from nested_decode.evaluation import decode_benchmark
from nested_decode.jobs import image
from nested_decode.jobs import stages


@pytest.fixture(scope='module')
def mnist_workdir(tmp_path_factory):
  """``configs/mnist.py:tiny`` trained (tokenizer, transformer) and sampled by the job."""
  workdir = str(tmp_path_factory.mktemp('mnist_tiny'))
  config = load_config('mnist', 'tiny')
  image.sample_stage(config, workdir)
  return workdir, config


def test_the_api_decodes_what_the_job_decoded(mnist_workdir):
  workdir, config = mnist_workdir
  model = api.load(workdir)  # the config comes from the transformer's checkpoint
  assert json.loads(model.config.to_json()) == json.loads(config.to_json())
  labels = stages.sample_labels(config)
  flops = {row['schedule']: row for row in decode_benchmark.flops_rows(config)}
  for name in config_lib.schedules_with_baseline(config):
    job = np.load(image.samples_path(workdir, name))
    samples = model.sample(labels, name, seed=config.seed, batch_size=config.eval.batch_size)
    np.testing.assert_array_equal(samples.images, job['images'])
    assert samples.gflops_per_sample == pytest.approx(flops[name]['gflops_per_sample'])
    assert samples.flop_ratio == pytest.approx(flops[name]['flop_ratio'])
    assert samples.seconds > 0 and samples.compile_seconds > 0

  again = model.sample(labels, 'magnets', seed=config.seed, batch_size=config.eval.batch_size)
  assert again.compile_seconds == 0  # compiled once per schedule and batch shape
  written = model.sample(labels, '8x3,4x3,2x3,1x3', cache='refresh_on_switch',
                         seed=config.seed, batch_size=config.eval.batch_size)
  np.testing.assert_array_equal(written.images, again.images)


def test_an_exported_model_samples_the_same(mnist_workdir, tmp_path):
  workdir, config = mnist_workdir
  model = api.load(workdir)
  path = str(tmp_path / 'model.msgpack')
  model.save(path)
  exported = api.load(path)
  first, second = (m.sample([7, 1, 3, 3], 'magnets', seed=5) for m in (model, exported))
  np.testing.assert_array_equal(first.images, second.images)
  assert first.images.shape == (4, 28, 28, 1) and first.images.dtype == np.uint8


def test_a_recorded_decode_shows_every_step(mnist_workdir):
  workdir, config = mnist_workdir
  model = api.load(workdir)
  samples = model.sample([0, 5], '8x4,4x4,2x2,1x2', seed=1, record_steps=True)
  steps = samples.step_tokens
  plan = config_lib.decode_plan(config, model.schedule('8x4,4x4,2x2,1x2'))
  assert steps.shape == (2, 12, 49) and samples.step_widths == [8] * 4 + [4] * 4 + [2] * 2 + [1] * 2
  np.testing.assert_array_equal(steps[:, -1], samples.tokens)
  masked = steps == model.mask_id
  assert masked.sum(-1).tolist() == [[step.masked_after for step in plan]] * 2
  for t in range(1, 12):  # a revealed token is never masked again nor changed
    kept = ~masked[:, t - 1]
    np.testing.assert_array_equal(steps[:, t][kept], steps[:, t - 1][kept])
  canvases = model.decode(steps.reshape(-1, 49))
  assert canvases.shape == (24, 28, 28, 1)


def test_bad_input_gets_one_clear_error(mnist_workdir, tmp_path):
  workdir, _ = mnist_workdir
  with pytest.raises(api.NotTrainedError, match='no trained transformer'):
    api.load(str(tmp_path))
  with pytest.raises(api.NotTrainedError, match='no such model file'):
    api.load(str(tmp_path / 'missing.msgpack'))
  model = api.load(workdir)
  with pytest.raises(api.ScheduleError, match=r'factors \[3\] are not in '
                     r'config.model.nesting_factors=\(1, 2, 4, 8\)'):
    model.sample([1], '3x12')
  with pytest.raises(api.ScheduleError, match='its 60 steps are more than the 49 tokens'):
    model.sample([1], '8x40,1x20')
  with pytest.raises(api.ScheduleError, match='positive number of steps'):
    model.sample([1], '8x0,1x12')
  with pytest.raises(api.ScheduleError, match="neither a name .*baseline, magnets"):
    model.sample([1], 'fastest')
  with pytest.raises(api.ScheduleError, match="schedule.cache='sometimes' is invalid"):
    model.sample([1], 'magnets', cache='sometimes')
  with pytest.raises(tasks.LabelError, match='10'):
    model.sample([3, 10], 'magnets')
  with pytest.raises(ValueError, match='call sample'):
    model.predict_frames(np.zeros((1, 5, 28, 28, 1), np.uint8))
