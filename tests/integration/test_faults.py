"""Preemption, faults and bad input: each ends in a resumable state or in one clear error."""

import glob
import importlib.util
import io
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import preemptible_train
import pytest
from conftest import HELPERS, ROOT
from PIL import Image

from nested_decode import config_lib, io_utils, parallel
from nested_decode.checkpoints import Checkpointer
from nested_decode.data import imagenet, pipeline
from nested_decode.inference import restore
from nested_decode.models.transformer import NestedMaskedTransformer
from nested_decode.training import loop, train_transformer

SCRIPT = os.path.join(HELPERS, 'preemptible_train.py')
NUM_STEPS = 15  # of the subprocess trainer, which checkpoints every 3 steps


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  """Subprocess variables sharing one JAX compilation cache: only the first run compiles."""
  return dict(PYTHONPATH=ROOT, JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp('jax_cache')))


@pytest.fixture(params=['local', 'gcs'])
def local_or_bucket_dir(request, tmp_path):
  """A local folder, or a folder in the session's emulated bucket (`gcs_bucket`)."""
  if request.param == 'local':
    return str(tmp_path)
  return io_utils.join(request.getfixturevalue('gcs_bucket'), request.function.__name__)


def start(args, logdir, env, module=False):
  """Starts the trainer (or ``main``) with ``os.environ`` as it is now (with the emulator's
  variables once ``gcs_bucket`` is set up) plus ``env``; its stderr goes to local ``logdir``."""
  os.makedirs(logdir, exist_ok=True)
  command = [sys.executable, '-m', 'nested_decode.main'] if module else [sys.executable, SCRIPT]
  stderr = open(os.path.join(logdir, 'stderr.txt'), 'w')
  return subprocess.Popen(command + [str(a) for a in args], cwd=ROOT, env={**os.environ, **env},
                          stdout=subprocess.DEVNULL, stderr=stderr)


def finish(process, logdir, timeout=300):
  rc = process.wait(timeout)
  with open(os.path.join(logdir, 'stderr.txt')) as f:
    return rc, f.read()


def wait_for(condition, process, timeout=300):
  deadline = time.time() + timeout
  while not condition():
    assert process.poll() is None, 'the trainer ended before the test could interrupt it'
    assert time.time() < deadline, 'timed out'
    time.sleep(0.05)


def metric_rows(path):
  if not io_utils.exists(path):
    return []
  return [json.loads(line) for line in io_utils.read_text(path).splitlines()]


def last_loss_per_step(path):
  return {row['step']: row['loss'] for row in metric_rows(path)}


@pytest.fixture(scope='module')
def reference_losses(tmp_path_factory, env):
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  rc, stderr = finish(start([workdir, NUM_STEPS], workdir, env), workdir)
  assert rc == 0, stderr
  return last_loss_per_step(os.path.join(workdir, 'transformer_metrics.jsonl'))


# ----------------------------------------------------------------------------------------------
# Preemption and interrupted writes, with the real trainer in a subprocess
# ----------------------------------------------------------------------------------------------

def test_sigterm_saves_the_step_reached_and_the_resumed_run_matches_an_uninterrupted_one(
    tmp_path, local_or_bucket_dir, env, reference_losses):
  workdir = local_or_bucket_dir
  metrics = io_utils.join(workdir, 'transformer_metrics.jsonl')
  trainer = start([workdir, NUM_STEPS, 0.2], tmp_path, env)  # slowed: the signal lands mid-run
  wait_for(lambda: len(metric_rows(metrics)) >= 1, trainer)
  trainer.send_signal(signal.SIGTERM)
  rc, stderr = finish(trainer, tmp_path)
  assert rc == loop.Preempted.exit_code == 143, stderr
  reached = metric_rows(metrics)[-1]['step']
  assert reached < NUM_STEPS
  assert (f'Preempted: transformer training stopped by SIGTERM at step {reached}; '
          f'its checkpoint is in {workdir}/transformer') in stderr
  assert 'Traceback' not in stderr
  assert Checkpointer(io_utils.join(workdir, 'transformer')).latest_step() == reached

  rc, stderr = finish(start([workdir, NUM_STEPS], tmp_path, env), tmp_path)
  assert rc == 0, stderr
  steps = [row['step'] for row in metric_rows(metrics)]
  assert steps == list(range(1, NUM_STEPS + 1))  # went on from the step reached, none redone
  losses = last_loss_per_step(metrics)
  for step in range(1, NUM_STEPS + 1):
    assert losses[step] == pytest.approx(reference_losses[step], rel=1e-5), step


def test_a_checkpoint_write_killed_half_way_leaves_the_last_good_one(
    tmp_path, env, reference_losses):
  workdir = str(tmp_path)
  directory = os.path.join(workdir, 'transformer')
  trainer = start([workdir, NUM_STEPS, 0.0, 6], workdir, env)  # the write of step 6 hangs
  wait_for(lambda: os.path.exists(os.path.join(workdir, 'STALLED')), trainer)
  trainer.kill()
  finish(trainer, workdir)
  assert glob.glob(os.path.join(directory, '6.orbax-checkpoint-tmp*'))
  assert not os.path.exists(os.path.join(directory, '6'))
  assert Checkpointer(directory).latest_step() == 3
  config = preemptible_train.config(NUM_STEPS)
  params = restore.transformer_params(config, workdir, parallel.make_mesh(config))
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(params))

  rc, stderr = finish(start([workdir, NUM_STEPS], workdir, env), workdir)
  assert rc == 0, stderr
  assert not glob.glob(os.path.join(directory, '*orbax-checkpoint-tmp*'))  # cleaned up
  assert Checkpointer(directory).latest_step() == NUM_STEPS
  losses = last_loss_per_step(os.path.join(workdir, 'transformer_metrics.jsonl'))
  for step in range(4, NUM_STEPS + 1):  # redone from the checkpoint of step 3
    assert losses[step] == pytest.approx(reference_losses[step], rel=1e-5), step


def test_main_exits_143_on_sigterm_with_a_checkpoint_and_the_same_command_resumes(
    tmp_path, env):
  workdir = str(tmp_path)
  metrics = os.path.join(workdir, 'tokenizer_metrics.jsonl')
  args = ['--config=configs/mnist.py:tiny', f'--workdir={workdir}', '--mode=train_tokenizer',
          '--config.tokenizer_training.num_steps=40', '--config.tokenizer_training.log_every=1',
          '--config.tokenizer_training.checkpoint_every=1000']  # only SIGTERM's and the last
  trainer = start(args, workdir, env, module=True)
  wait_for(lambda: len(metric_rows(metrics)) >= 1, trainer)
  trainer.send_signal(signal.SIGTERM)
  rc, stderr = finish(trainer, workdir)
  assert rc == 143, stderr
  reached = metric_rows(metrics)[-1]['step']
  assert f'tokenizer training stopped by SIGTERM at step {reached}' in stderr.splitlines()[-1]
  assert 'Traceback' not in stderr
  assert Checkpointer(os.path.join(workdir, 'tokenizer')).latest_step() == reached

  rc, stderr = finish(start(args, workdir, env, module=True), workdir)
  assert rc == 0, stderr
  assert f'Resuming tokenizer training from step {reached}' in stderr
  assert [row['step'] for row in metric_rows(metrics)] == list(range(1, 41))


def start_two_processes(*args):
  """Both processes of ``two_processes.py``, with ``os.environ`` as it is now."""
  with socket.socket() as probe:
    probe.bind(('127.0.0.1', 0))
    port = probe.getsockname()[1]
  script = os.path.join(HELPERS, 'two_processes.py')
  return [subprocess.Popen(
      [sys.executable, script, args[0], str(port), str(i)] + [str(a).format(i=i) for a in args[1:]],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE,
      stderr=subprocess.DEVNULL, text=True) for i in range(2)]


@pytest.mark.parametrize('jax_service', [True, False], ids=['jax_preemption_service',
                                                          'allgather'])
def test_all_processes_stop_at_the_same_step_when_one_gets_sigterm(tmp_path, jax_service):
  processes = start_two_processes('stop', int(jax_service), tmp_path / 'ready{i}')
  for i, process in enumerate(processes):
    wait_for(lambda i=i: (tmp_path / f'ready{i}').exists(), process, timeout=120)
  processes[1].send_signal(signal.SIGTERM)  # only one process gets the notice
  outputs = [process.communicate(timeout=120)[0].strip() for process in processes]
  assert [process.returncode for process in processes] == [0, 0], outputs
  steps = [int(output.split('stopped at step ')[1].split()[0]) for output in outputs]
  assert steps[0] == steps[1], outputs


def test_each_process_gets_back_its_own_data_position(local_or_bucket_dir):
  directory = io_utils.join(local_or_bucket_dir, 'checkpoints')
  processes = start_two_processes('checkpoint', directory)
  outputs = [process.communicate(timeout=120)[0].strip() for process in processes]
  assert [process.returncode for process in processes] == [0, 0], outputs
  assert [output.splitlines()[-1] for output in outputs] == ['position 10', 'position 11']
  assert Checkpointer(directory).latest_step() == 1


# ----------------------------------------------------------------------------------------------
# The loop in this process: signals, NaN and inf
# ----------------------------------------------------------------------------------------------

@flax.struct.dataclass
class ToyState:
  step: jax.Array
  w: jax.Array


class Counter:
  """Batches 0, 1, 2, ...; calls ``at[position]()`` just before handing out that batch."""

  def __init__(self, position=0, at=None):
    self.position, self.at = position, at or {}

  def __next__(self):
    if self.position in self.at:
      self.at[self.position]()
    self.position += 1
    return self.position - 1


def toy_step(nan_loss_at=None, nan_state_at=None):
  def train_step(state, batch):
    step = state.step + 1
    w = state.w + batch
    if step == nan_state_at:
      w = w.at[0].set(jnp.inf)
    loss = jnp.float32(jnp.nan if step == nan_loss_at else 1.0)
    return ToyState(step, w), {'loss': loss}
  return train_step


def run_toy(workdir, train_step, num_steps, at=None, checkpoint_every=2, log_every=1):
  return loop.run(
      name='toy', config=ml_collections.ConfigDict({'seed': 0}), workdir=str(workdir),
      initial_state=ToyState(jnp.array(0, jnp.int32), jnp.zeros(3)), train_step=train_step,
      batches=(lambda s: Counter(0 if s is None else s['position'], at),
               lambda it: {'position': it.position}),
      prepare=lambda b: b, num_steps=num_steps, log_every=log_every,
      checkpoint_every=checkpoint_every, keep_checkpoints=10)


def restored(workdir, step=None):
  abstract = jax.eval_shape(lambda: ToyState(jnp.array(0, jnp.int32), jnp.zeros(3)))
  return Checkpointer(os.path.join(workdir, 'toy')).restore(abstract, step)


def test_sigterm_in_the_loop_checkpoints_that_step_and_restores_the_previous_handler(tmp_path):
  def previous(signum, frame):
    raise AssertionError('the loop should have caught the signal')
  signal.signal(signal.SIGTERM, previous)
  try:
    sigterm = lambda: os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(loop.Preempted, match='toy training stopped by SIGTERM at step 5') as info:
      run_toy(tmp_path, toy_step(), num_steps=20, at={4: sigterm}, checkpoint_every=10)
    assert info.value.step == 5
    assert signal.getsignal(signal.SIGTERM) is previous
  finally:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
  state, position, _ = restored(tmp_path)
  assert int(state.step) == 5 and position == {'position': 5}
  np.testing.assert_array_equal(state.w, np.full(3, 0 + 1 + 2 + 3 + 4))
  final = run_toy(tmp_path, toy_step(), num_steps=7, checkpoint_every=10)
  assert int(final.step) == 7
  np.testing.assert_array_equal(final.w, np.full(3, sum(range(7))))  # batches 5, 6 came next


def test_a_nan_loss_at_a_checkpoint_step_stops_without_saving_it(tmp_path):
  with pytest.raises(FloatingPointError, match='toy loss became nan at step 4'):
    run_toy(tmp_path, toy_step(nan_loss_at=4), num_steps=10)
  assert Checkpointer(os.path.join(tmp_path, 'toy')).latest_step() == 2
  state, _, _ = restored(tmp_path)
  assert np.all(np.isfinite(state.w))


def test_a_nan_loss_between_reads_is_caught_before_the_next_checkpoint(tmp_path):
  """Losses are read every log_every (5) steps, checkpoints every 2: the NaN of step 3 stops
  the run at step 4, before step 4's state is saved, naming step 3."""
  with pytest.raises(FloatingPointError, match='toy loss became nan at step 3'):
    run_toy(tmp_path, toy_step(nan_loss_at=3), num_steps=10, log_every=5)
  assert Checkpointer(os.path.join(tmp_path, 'toy')).latest_step() == 2


def record_implicit_device_reads(monkeypatch) -> list:
  """Patches jax.Array so that reading a value other than through ``jax.device_get`` (``float``,
  ``np.asarray``, ``.item()``) is recorded. (``jax.transfer_guard`` does not fire on the CPU.)"""
  from jax._src import array  # pylint: disable=import-outside-toplevel
  reads, explicit = [], [0]
  value, to_numpy = array.ArrayImpl._value, array.ArrayImpl.__array__

  def record(read):
    def recorded(self, *args, **kwargs):
      if not explicit[0]:
        reads.append(self.shape)
      return read(self, *args, **kwargs)
    return recorded

  def device_get(tree, _get=jax.device_get):
    explicit[0] += 1
    try:
      return _get(tree)
    finally:
      explicit[0] -= 1

  monkeypatch.setattr(array.ArrayImpl, '_value', property(record(value.fget)))
  monkeypatch.setattr(array.ArrayImpl, '__array__', record(to_numpy))
  monkeypatch.setattr(jax, 'device_get', device_get)
  return reads


def test_steps_read_nothing_back_from_the_device_but_at_log_steps(tmp_path, monkeypatch):
  @jax.jit
  def train_step(state, batch):
    return ToyState(state.step + 1, state.w + batch), {'loss': jnp.sum(state.w) + 1.0}
  reads = record_implicit_device_reads(monkeypatch)
  final = loop.run(
      name='toy', config=ml_collections.ConfigDict({'seed': 0}), workdir=str(tmp_path),
      initial_state=ToyState(jnp.array(0, jnp.int32), jnp.zeros(3)), train_step=train_step,
      batches=(lambda s: Counter(), lambda it: {'position': it.position}),
      prepare=lambda b: b, num_steps=100, log_every=4, checkpoint_every=100, keep_checkpoints=1,
      stop_after=8)  # 8 steps, two log steps, no checkpoint
  assert reads == []
  assert int(jax.device_get(final.step)) == 8
  lines = [json.loads(line) for line in (tmp_path / 'toy_metrics.jsonl').read_text().splitlines()]
  # loss of step k is 1 + 3 * (0 + 1 + ... + (k - 2)): the sum of w before that step's batch.
  losses = [1 + 3 * sum(range(k - 1)) for k in range(1, 9)]
  assert [line['loss'] for line in lines] == pytest.approx([np.mean(losses[:4]),
                                                            np.mean(losses[4:])])


def test_inf_in_the_state_with_a_finite_loss_is_never_checkpointed(tmp_path):
  with pytest.raises(FloatingPointError, match=r'toy state has non-finite values in w at step 4'):
    run_toy(tmp_path, toy_step(nan_state_at=4), num_steps=10)
  assert Checkpointer(os.path.join(tmp_path, 'toy')).latest_step() == 2
  # The run can go on from the good checkpoint once the cause is fixed.
  assert int(run_toy(tmp_path, toy_step(), num_steps=6).step) == 6


# ----------------------------------------------------------------------------------------------
# Bad input: one clear error each
# ----------------------------------------------------------------------------------------------

def run_main(*args):
  return subprocess.run([sys.executable, '-m', 'nested_decode.main', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def one_line_error(result):
  assert result.returncode == 1, result.stderr
  assert 'Traceback' not in result.stderr
  lines = [line for line in result.stderr.strip().splitlines()
           if not line.startswith('Pass --helpshort')]  # absl's hint after a flag error
  return lines[-1]


@pytest.mark.parametrize('override, expected', [
    ('--config.model.width=100', 'config.model.width=100 is invalid: must be divisible by '
                                 'every nesting factor'),
    ('--config.model.width=abc', 'flag --config.model.width=abc: invalid literal for int()'),
    ('--config.model.widht=64', "--config.model.widht: the config has no key 'widht'. "
                                'Did you mean "width" instead of "widht"?'),
    ('--config.eval.schedules.magnets.widths=3', 'config.eval.schedules.magnets.widths=(3,) '
                                                 'is invalid: must be a tuple of'),
])
def test_main_names_a_bad_config_value(tmp_path, override, expected):
  result = run_main('--config=configs/mnist.py:tiny', f'--workdir={tmp_path}', '--mode=flops',
                    override)
  assert expected in one_line_error(result)
  assert not (tmp_path / 'flops.json').exists()


def test_main_names_a_missing_dataset_directory(tmp_path):
  missing = tmp_path / 'no_such_data'
  result = run_main('--config=configs/imagenet256.py:tiny', f'--workdir={tmp_path}/run',
                    '--mode=train_tokenizer', f'--config.data.data_dir={missing}')
  line = one_line_error(result)
  assert line.startswith('MissingDataError: configs/imagenet256.py:tiny cannot find its data '
                         f'(No prepared imagenet2012 (ArrayRecord) in data_dir {missing}.')
  assert '--config.data.data_dir' in line
  assert not missing.exists()


def test_main_names_both_shapes_of_a_checkpoint_from_another_model(tmp_path):
  spec = importlib.util.spec_from_file_location('mnist_config',
                                                os.path.join(ROOT, 'configs', 'mnist.py'))
  mnist_config = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mnist_config)
  wider = mnist_config.get_config('tiny')
  wider.model.width = 128
  model = NestedMaskedTransformer(config_lib.transformer_config(wider))
  checkpointer = Checkpointer(str(tmp_path / 'transformer'))
  state = train_transformer.create_train_state(wider, model, parallel.make_mesh(wider))
  checkpointer.save(wider.training.num_steps, state, {'position': 0}, wider)
  checkpointer.close()
  result = run_main('--config=configs/mnist.py:tiny', f'--workdir={tmp_path}', '--mode=train')
  line = one_line_error(result)
  assert line.startswith(f'CheckpointShapeError: Checkpoint {tmp_path}/transformer step 4: ')
  assert 'has shape' in line and ', 128) but the model expects' in line and ', 64)' in line


def test_main_names_a_workdir_it_cannot_write(tmp_path):
  (tmp_path / 'file').write_text('not a directory')
  result = run_main('--config=configs/mnist.py:tiny', f'--workdir={tmp_path}/file/run',
                    '--mode=flops')
  assert one_line_error(result).startswith(
      f'--workdir: {tmp_path}/file/run is not a writable directory: [Errno 20] Not a directory')


def test_unwritable_directories_are_named(tmp_path):
  (tmp_path / 'file').write_text('x')
  for path in (tmp_path / 'file', tmp_path / 'file' / 'run'):
    with pytest.raises(OSError, match=f'{path} is not a writable directory'):
      io_utils.ensure_writable_dir(str(path))
  io_utils.ensure_writable_dir(str(tmp_path / 'new' / 'run'))
  assert os.listdir(tmp_path / 'new' / 'run') == []  # the probe file is gone
  # Permission bits do not stop root (the tests' usual user); sysfs refuses new files to all.
  refused = '/sys/nested_decode_write_test'
  try:
    io_utils.ensure_writable_dir(refused)
  except OSError as error:
    assert f'{refused} is not a writable directory' in str(error)
  else:
    os.rmdir(refused)
    pytest.skip(f'{refused} was writable here')


def jpeg_bytes():
  image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
  encoded = io.BytesIO()
  Image.fromarray(image).save(encoded, format='JPEG')
  return encoded.getvalue()


@pytest.mark.parametrize('data', [b'not a jpeg', jpeg_bytes()[:300]],
                         ids=['garbage', 'truncated'])
def test_an_undecodable_image_names_its_file(data):
  example = {'image': data, 'label': 3, 'file_name': b'n01440764_10026.JPEG'}
  expected = 'imagenet2012 image n01440764_10026.JPEG cannot be decoded'
  with pytest.raises(io_utils.CorruptDataError, match=expected):
    imagenet.EvalTransform(16).map(example)
  with pytest.raises(io_utils.CorruptDataError, match=expected):
    imagenet.TrainTransform(16).random_map(example, np.random.default_rng(0))
  good = dict(example, image=jpeg_bytes())
  assert imagenet.EvalTransform(16).map(good)['image'].shape == (16, 16, 3)


def test_a_record_that_fails_to_decode_names_its_example_through_the_loader():
  import tensorflow_datasets as tfds
  feature = tfds.features.Image(shape=(None, None, 3))  # what TFDS decodes records with

  class Records:
    def __init__(self, records):
      self.records = records

    def __len__(self):
      return len(self.records)

    def __getitem__(self, index):
      return {'image': feature.decode_example_np(self.records[index]), 'label': index}

    def __repr__(self):
      return 'Records(imagenet2012 train)'

  source = imagenet.DecodeCheckedSource(Records([jpeg_bytes()] * 2 + [b'garbage']),
                                        'imagenet2012 train in /data')
  assert repr(source) == 'Records(imagenet2012 train)'  # grain's saved states still match
  loader = pipeline.make_loader(source, batch_size=1, seed=0, train=False,
                                transform=imagenet.EvalTransform(16))
  iterator = iter(loader)
  next(iterator), next(iterator)
  with pytest.raises(io_utils.CorruptDataError,
                     match='Example 2 of imagenet2012 train in /data cannot be decoded'):
    next(iterator)


def test_the_decode_checked_source_reaches_grain_worker_processes():
  """Workers get the source pickled; a delegating ``__getattr__`` must survive unpickling."""
  source = imagenet.DecodeCheckedSource([{'image': jpeg_bytes(), 'label': 1}] * 2, 'two images')
  copy = pickle.loads(pickle.dumps(source))
  assert copy[1]['label'] == 1 and len(copy) == 2
