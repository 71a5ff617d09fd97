import json
import os
import re
import subprocess
import sys

import gcsfs
import numpy as np
import pytest
from conftest import ROOT, cpu_env, free_port, load_config, start_main

from nested_decode import api, config_lib, io_utils, parallel, tasks
from nested_decode.checkpoints import Checkpointer
from nested_decode.decoding import sampler
from nested_decode.inference import decode_cost
from nested_decode.pipeline import image, stages

ROW_KEYS = {'schedule', 'cache', 'steps', 'gflops_per_sample', 'flop_ratio'}


def run_main(*args, cwd=ROOT, env=None, timeout=300):
  return subprocess.run([sys.executable, '-m', 'nested_decode.main', *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_flops_mode_writes_rows_for_baseline_and_every_schedule(tmp_path):
  result = run_main('--config=configs/imagenet256.py', f'--workdir={tmp_path}', '--mode=flops')
  assert result.returncode == 0, result.stderr
  report = json.loads((tmp_path / 'flops.json').read_text())
  assert report['config'] == 'configs/imagenet256.py' and report['device']
  rows = {row['schedule']: row for row in report['rows']}
  assert report['rows'][0]['schedule'] == 'baseline'
  assert set(rows) == {'baseline', 'magnets', 'magnets_nocache', 'magnets_small_heavy'}
  for row in report['rows']:
    assert ROW_KEYS <= set(row)
    assert row['flop_ratio'] == pytest.approx(
        rows['baseline']['gflops_per_sample'] / row['gflops_per_sample'])
  assert rows['magnets']['flop_ratio'] >= 3


def test_bench_train_mode_writes_step_rates_and_data_waits(tmp_path):
  result = run_main('--config=configs/mnist.py:tiny', f'--workdir={tmp_path}',
                    '--mode=bench_train', '--config.bench.train_warmup_steps=1',
                    '--config.bench.train_steps=2', '--config.training.widths=(1, 8)',
                    env=cpu_env(1))
  assert result.returncode == 0, result.stderr
  report = json.loads((tmp_path / 'bench_train.json').read_text())
  rows = report['rows']
  assert set(rows) == {'transformer_single', 'transformer_nested', 'tokenizer'}
  assert rows['transformer_single']['widths'] == [1]
  assert rows['transformer_nested']['widths'] == [1, 8]
  for row in rows.values():
    assert row['steps'] == 2 and row['step_seconds'] > 0
    assert row['steps_per_second'] == pytest.approx(1 / row['step_seconds'])
    assert row['examples_per_second'] == pytest.approx(16 * row['steps_per_second'])
    assert 0 <= row['data_wait_seconds'] <= 2 * row['step_seconds']
    assert row['data_wait_fraction'] == pytest.approx(
        row['data_wait_seconds'] / (2 * row['step_seconds']))
  assert report['nested_over_single'] == pytest.approx(
      rows['transformer_nested']['step_seconds'] / rows['transformer_single']['step_seconds'])
  assert report['dense_flop_ratio'] == pytest.approx(1 + 1 / 64)
  assert 1 + 1 / 64 < report['flop_ratio'] < 1 + 1 / 8  # attention shrinks only linearly


def test_bench_mode_times_every_schedule_with_config_overrides(tmp_path):
  result = run_main('--config=configs/k600.py:tiny', f'--workdir={tmp_path}', '--mode=bench',
                    '--config.model.num_layers=1', '--config.bench.timed_runs=1',
                    '--config.bench.batch_size=2',
                    '--config.eval.schedules.magnets.widths=((8, 6), (1, 6))')
  assert result.returncode == 0, result.stderr
  report = json.loads((tmp_path / 'bench.json').read_text())
  rows = {row['schedule']: row for row in report['rows']}
  assert rows['baseline']['speedup'] == 1.0
  for row in report['rows']:
    assert ROW_KEYS | {'seconds_per_batch', 'speedup'} <= set(row)
    assert row['seconds_per_batch'] > 0
  assert rows['magnets']['widths'] == [[8, 6], [1, 6]]
  assert not [name for name in os.listdir(tmp_path) if name.endswith('.tmp')]


def test_bad_config_value_fails_before_running(tmp_path):
  result = run_main('--config=configs/imagenet256.py:tiny', f'--workdir={tmp_path}',
                    '--mode=flops', '--config.eval.schedules.magnets.cache=sometimes')
  assert result.returncode != 0
  assert "config.eval.schedules.magnets.cache='sometimes'" in result.stderr
  assert not (tmp_path / 'flops.json').exists()


def test_main_job_on_tiny_mnist_in_a_bucket_writes_samples_and_eval_then_skips_finished_stages(
    mnist_tiny_job):
  """The job with its workdir on Cloud Storage (the session's emulated bucket, see
  tests/helpers/gcs_emulator.py) and nothing of it on local disk: run from an empty folder, with an
  empty TMPDIR, both stay empty. (Local workdirs: the video job and the trainers' tests.)"""
  job = mnist_tiny_job
  workdir, cwd, env = job.workdir, job.cwd, job.env
  command = [f'--config={ROOT}/configs/mnist.py:tiny', f'--workdir={workdir}']
  assert os.listdir(cwd) == [] and os.listdir(job.tmp) == []
  assert not os.path.exists(os.path.join(ROOT, 'gs:'))
  report = json.loads(io_utils.read_text(io_utils.join(workdir, 'eval.json')))
  names = [row['schedule'] for row in report['rows']]
  assert names[0] == 'baseline' and 'magnets' in names
  for row in report['rows']:
    assert ROW_KEYS | {'class_accuracy', 'fd'} <= set(row)
    assert 0.0 <= row['class_accuracy'] <= 1.0 and row['fd'] >= 0.0
  for name in names:
    samples = io_utils.load_npz(io_utils.join(workdir, 'samples', f'{name}.npz'))
    assert samples['images'].dtype == np.uint8 and samples['images'].shape[1:] == (28, 28, 1)
    assert len(samples['labels']) == len(samples['images'])
    png = io_utils.read_bytes(io_utils.join(workdir, 'samples', f'{name}.png'))
    assert png.startswith(b'\x89PNG')
  for trainer in ('tokenizer', 'transformer'):
    assert Checkpointer(io_utils.join(workdir, trainer)).latest_step() == 4
    lines = io_utils.read_text(io_utils.join(workdir, f'{trainer}_metrics.jsonl')).splitlines()
    assert [json.loads(line)['step'] for line in lines] == [2, 4]
  assert io_utils.exists(io_utils.join(workdir, 'classifier', 'params.msgpack'))
  assert io_utils.exists(io_utils.join(workdir, 'tokens', 'eval-00000-of-00001.npz'))

  again = run_main(*command, '--mode=sample', cwd=cwd, env=env, timeout=600)
  assert again.returncode == 0, again.stderr
  assert 'Sampling' not in again.stderr and '[transformer] step' not in again.stderr

  search = run_main(*command, '--mode=search_schedule', '--config.search.max_rounds=1',
                    '--config.search.proxy_samples=10', '--config.study.seeds=1',
                    cwd=cwd, env=env, timeout=600)
  assert search.returncode == 0, search.stderr
  found = json.loads(io_utils.read_text(io_utils.join(workdir, 'search', 'result.json')))
  assert found['proxy']['reference'] == 'first 1000 training digits'
  assert {'searched', 'magnets', 'baseline'} <= set(found['heldout'])
  snippet = io_utils.read_text(io_utils.join(workdir, 'search', 'best_schedule.py'))
  assert snippet.startswith('config.eval.schedules.searched = config_lib.schedule(')

  # Cached steps padded to 4 query buckets: fewer programs to compile, and the option tested.
  # The separately trained models are trained and scored by the scaling study's test below;
  # two of the grid's schedules (and the baseline) stand for the rest.
  study_schedules = ('up_8x3_4x3_2x3_1x3', 'alone_p8')
  study = run_main(*command, '--mode=study', '--config.sampling.query_buckets=4',
                   '--config.study.variants=False', f'--config.study.schedules={study_schedules}',
                   cwd=cwd, env=env, timeout=900)
  assert study.returncode == 0, study.stderr
  report = json.loads(io_utils.read_text(io_utils.join(workdir, 'study', 'results.json')))
  rows = {(row['schedule'], row['cache']): row for row in report['rows']}
  assert {name for name, _ in rows} == {'baseline_T12', *study_schedules}
  assert len(rows) == 2 * 3
  baseline = rows['baseline_T12', 'none']
  assert baseline['flop_ratio'] == 1 and baseline['fd_diff'] == 0 == baseline['fd_diff_se']
  for row in report['rows']:
    assert len(row['fd_per_seed']) == 2 and row['class_accuracy_diff_se'] >= 0
    assert row['fd_diff'] == pytest.approx(row['fd_mean'] - baseline['fd_mean'])
  assert rows['up_8x3_4x3_2x3_1x3', 'refresh_on_switch']['flop_ratio'] > 3
  assert 0 < report['decode_compile_seconds']
  assert [m['model'] for m in report['models']] == ['nested']
  for name in ('results.md', 'fd_vs_gflops.png'):
    assert io_utils.exists(io_utils.join(workdir, 'study', name))
  assert os.listdir(job.cwd) == [] and os.listdir(job.tmp) == []


def log_until_killed_after_3_tasks(run, config, workdir) -> list[str]:
  """What ``run(config, workdir, mesh, log=...)`` logged until it was killed after its third
  task."""

  class Killed(Exception):
    pass

  logged = []

  def log(message):
    logged.append(message)
    if sum(' done;' in m for m in logged) == 3:
      raise Killed

  with pytest.raises(Killed):
    run(config, workdir, parallel.make_mesh(config), log=log)
  return logged


def test_a_killed_scaling_study_resumes_without_recomputing_a_task(mnist_tiny_job):
  """In this process, on the bucket job's tokenizer, classifier and model (its w64_s4 point):
  stopped after three tasks, the rerun says what was done, runs only the rest and reports
  every model with its trend."""
  from nested_decode.studies import scaling_study
  config, workdir = load_config('mnist', 'tiny'), mnist_tiny_job.workdir

  first = log_until_killed_after_3_tasks(scaling_study.run_scaling_study, config, workdir)
  assert first[0] == 'scaling study: 1 of 8 tasks already done'  # the job's own model
  done_first = [m.split(' done;')[0] for m in first if ' done;' in m]
  assert done_first[0] == 'scaling study: w64_s2 nested training'
  rows_dir = io_utils.join(workdir, 'scaling', 'w64_s2', 'rows')
  stored = {n: io_utils.read_text(io_utils.join(rows_dir, n)) for n in
            ('baseline_T12.json', 'up_8x3_4x3_2x3_1x3_cached.json')}

  second = []
  report = scaling_study.run_scaling_study(config, workdir, parallel.make_mesh(config),
                                           log=second.append)
  assert second[0] == 'scaling study: 4 of 8 tasks already done'
  done_second = [m.split(' done;')[0] for m in second if ' done;' in m]
  assert len(done_second) == 4 and not set(done_first) & set(done_second)
  assert not any('[transformer] step' in m for m in second)  # trained models were loaded
  assert any('ETA' in m for m in second)
  for name, text in stored.items():
    assert io_utils.read_text(io_utils.join(rows_dir, name)) == text
  models = {m['name']: m for m in report['models']}
  assert set(models) == {'w64_s2', 'w64_s4'} and models['w64_s2']['separate_full_width'] is None
  separate = models['w64_s4']['separate_full_width']
  assert separate['model'] == 'separate' and separate['flop_ratio'] == pytest.approx(1.0)
  for model in models.values():
    assert model['best']['3x']['schedule'] == 'up_8x3_4x3_2x3_1x3_cached'
  fd_trend = report['trends']['3x/fd_gap']
  assert fd_trend['per_width_doubling'] is None and fd_trend['per_steps_doubling'] is not None
  for name in ('results.json', 'results.md', 'gap_vs_size.png'):
    assert io_utils.exists(io_utils.join(workdir, 'scaling', name))


def test_paper_configs_without_their_data_name_the_keys_and_the_offline_config(tmp_path):
  """No --workdir: the job defaults to runs/<config>; without data each paper config ends with
  one line naming what to set, before any work (and before the eval stage's FID gap)."""
  expected = {'imagenet256': ('--config.data.data_dir', 'configs/mnist.py'),
              'ucf101': ('--config.data.data_dir', 'configs/k600.py:tiny'),
              'k600': ('--config.data.video_dir', 'configs/k600.py:tiny')}
  env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path / 'no_tfds_data'))
  runs = {name: subprocess.Popen(
      [sys.executable, '-m', 'nested_decode.main', f'--config={ROOT}/configs/{name}.py'],
      cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for name in expected}
  for name, run in runs.items():
    _, stderr = run.communicate(timeout=300)
    last = stderr.strip().splitlines()[-1]
    assert run.returncode == 1, stderr
    assert last.startswith(f'MissingDataError: {ROOT}/configs/{name}.py cannot find its data')
    key, offline = expected[name]
    assert key in last and f'--config={offline}' in last, last
    assert 'Traceback' not in stderr
    assert (tmp_path / 'runs' / name).is_dir()  # the default workdir
  assert 'config.data.train_csv' in last and 'config.data.eval_csv' in last  # k600's keys


def test_default_workdir_names_the_config_and_its_variant():
  from nested_decode import main  # absl flags: imported only here
  assert main.default_workdir('configs/k600.py:tiny') == os.path.join('runs', 'k600_tiny')
  assert main.default_workdir('/abs/configs/mnist.py') == os.path.join('runs', 'mnist')


# ---- the job split over two processes (2 CPU devices each, one JAX cluster on localhost) ----

SCHEDULES = ('baseline', 'magnets')


def test_two_processes_split_encoding_sampling_and_eval(mnist_tiny_job, tmp_path):
  """The main job's stages split over two processes give what one process on 4 devices (the
  session's bucket job) gives: the same tokens, samples and eval.json, each process encoding
  and decoding half of the rows. The bucket job's trained stages are downloaded, and two
  processes run the eval stage from there in a local workdir."""
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
  split_tokens, _ = stages.token_dataset(config, str(workdir), 'eval', parallel.make_mesh(config))
  whole_tokens, _ = stages.token_dataset(config, reference, 'eval', parallel.make_mesh(config))
  np.testing.assert_array_equal(split_tokens, whole_tokens)

  # ... and decoded half of the samples of every schedule.
  for process, log in enumerate(logs):
    counts = re.findall(rf'Process {process} decoded (\d+) of (\d+) samples', log)
    assert counts and all(int(done) * 2 == int(total) for done, total in counts), counts


# ---- the Python API (nested_decode.api) on the bucket job's workdir ----

def test_the_api_decodes_what_the_job_decoded(mnist_tiny_job):
  """From the bucket job's workdir, on this process's one device: the job's samples (it
  decoded on 4 devices), its FLOPs, and a schedule written out equals its name."""
  workdir, config = mnist_tiny_job.workdir, load_config('mnist', 'tiny')
  sampler.decoder_for.cache_clear()  # decodes of earlier tests in this process compiled these
  model = api.load(workdir)  # the config comes from the transformer's checkpoint
  assert json.loads(model.config.to_json()) == json.loads(config.to_json())
  labels = stages.sample_labels(config)
  flops = {row['schedule']: row for row in decode_cost.flops_rows(config)}
  for name in SCHEDULES:
    job = io_utils.load_npz(image.samples_path(workdir, name))
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


def test_a_model_trained_with_one_attention_decodes_with_another(mnist_tiny_job):
  """sampling.attention_impl: the job trained and decoded with 'xla'; its parameters decode
  with 'deferred' into the job's samples (the two differ only in float rounding)."""
  workdir, config = mnist_tiny_job.workdir, load_config('mnist', 'tiny')
  assert config.model.attention_impl == 'xla' and config.sampling.attention_impl == ''
  deferred_config = config.copy_and_resolve_references()
  deferred_config.sampling.attention_impl = 'deferred'
  model = api.load(workdir, deferred_config)
  assert model.model_config.attention_impl == 'deferred'
  samples = model.sample(stages.sample_labels(config), 'magnets', seed=config.seed,
                         batch_size=config.eval.batch_size)
  job = io_utils.load_npz(image.samples_path(workdir, 'magnets'))
  np.testing.assert_array_equal(samples.images, job['images'])


def test_an_exported_model_samples_what_the_job_sampled(mnist_tiny_job, tmp_path):
  workdir, config = mnist_tiny_job.workdir, load_config('mnist', 'tiny')
  export = run_main(f'--config={ROOT}/configs/mnist.py:tiny', f'--workdir={workdir}',
                    '--mode=export', env=mnist_tiny_job.env)
  assert export.returncode == 0, export.stderr
  local = tmp_path / 'model.msgpack'
  local.write_bytes(io_utils.read_bytes(io_utils.join(workdir, 'model.msgpack')))
  exported = api.load(str(local))
  samples = exported.sample(stages.sample_labels(config), 'magnets', seed=config.seed,
                            batch_size=config.eval.batch_size)
  job = io_utils.load_npz(image.samples_path(workdir, 'magnets'))
  np.testing.assert_array_equal(samples.images, job['images'])
  assert samples.images.dtype == np.uint8


def test_a_recorded_decode_shows_every_step(mnist_tiny_job):
  config = load_config('mnist', 'tiny')
  model = api.load(mnist_tiny_job.workdir)
  samples = model.sample([0, 5], '8x4,4x4,2x2,1x2', seed=1, record_steps=True)
  steps = samples.step_tokens
  plan = model.schedule('8x4,4x4,2x2,1x2').plan(config_lib.decode_task(config))
  assert steps.shape == (2, 12, 49) and samples.step_widths == [8] * 4 + [4] * 4 + [2] * 2 + [1] * 2
  np.testing.assert_array_equal(steps[:, -1], samples.tokens)
  masked = steps == model.mask_id
  assert masked.sum(-1).tolist() == [[step.masked_after for step in plan]] * 2
  for t in range(1, 12):  # a revealed token is never masked again nor changed
    kept = ~masked[:, t - 1]
    np.testing.assert_array_equal(steps[:, t][kept], steps[:, t - 1][kept])
  canvases = model.decode(steps.reshape(-1, 49))
  assert canvases.shape == (24, 28, 28, 1)


def test_a_decode_with_fewer_steps_runs_exactly_its_steps_with_the_maskgit_counts(
    mnist_tiny_job):
  """A schedule of T != sampling.steps plans the mask schedule for its own T: MaskGIT's
  floor(N cos(pi/2 (t+1)/T)) tokens stay masked after step t, at least one revealed per step."""
  import math
  model = api.load(mnist_tiny_job.workdir)
  for spec, widths in (('1x4', [1] * 4), ('2x3', [2] * 3), ('8x1,1x2', [8, 1, 1])):
    samples = model.sample([0, 5, 9], spec, seed=2, record_steps=True)
    steps = len(widths)
    assert samples.step_tokens.shape == (3, steps, 49) and samples.step_widths == widths
    expected, remaining = [], 49
    for t in range(steps):
      keep = 0 if t == steps - 1 else max(1, min(remaining - 1, math.floor(
          49 * math.cos(math.pi / 2 * (t + 1) / steps))))
      expected.append(keep)
      remaining = keep
    masked = (samples.step_tokens == model.mask_id).sum(-1)
    assert masked.tolist() == [expected] * 3, spec
    assert samples.gflops_per_sample < model.sample([0], 'baseline').gflops_per_sample


def test_a_killed_frontier_resumes_and_picks_each_family_on_validation(mnist_tiny_job):
  """The frontier on the bucket job's model and a separately trained full-width one, in this
  process: killed after a few rows, the rerun scores only the rest; every pick is the
  validation-best of its family within its budget, and only the picks (and the baseline) are
  scored on the held-out digits."""
  from nested_decode.decoding import families
  from nested_decode.studies import frontier, study
  config, workdir = load_config('mnist', 'tiny'), mnist_tiny_job.workdir
  separate = study.separate_config(config, 1)
  study.train_variant(separate, workdir, io_utils.join(workdir, 'study', 'separate_width64'),
                      parallel.make_mesh(separate))

  first = log_until_killed_after_3_tasks(frontier.run_frontier, config, workdir)
  second = []
  report = frontier.run_frontier(config, workdir, parallel.make_mesh(config), log=second.append)
  assert second[0].startswith('frontier: 3 of ') and any('ETA' in m for m in second)
  done_first = {m.split(' done;')[0] for m in first if ' done;' in m}
  done_second = {m.split(' done;')[0] for m in second if ' done;' in m}
  assert len(done_first) == 3 and not done_first & done_second
  assert any(' round 1 ' in m for m in done_second)  # the MaGNeTS search ran

  validation = report['validation_candidates']
  from etils import epath
  test_rows = {p.name for p in epath.Path(io_utils.join(workdir, 'frontier', 'test')).iterdir()}
  picked = set()
  for entry in report['budgets']:
    assert set(entry['families']) == {'fewer_steps', 'sub_model', 'magnets', 'separate'}
    for family, row in entry['families'].items():
      eligible = [r for r in validation
                  if r['family'] == family and r['flop_ratio'] >= entry['budget']]
      best = min(eligible, key=lambda r: (r['objective'], -r['flop_ratio']))
      assert (row['spec'], row['cache']) == (best['spec'], best['cache'])
      if family == 'separate':
        assert row['model'] == 'separate_width64' and row['widths'][0][0] == 1
      else:
        assert families.family_of(tuple(map(tuple, row['widths']))) == family
      assert row['flop_ratio'] >= entry['budget'] and len(row['fd_per_seed']) == 2
      assert row['vs_best_other']['family'] != family
      assert row['vs_best_other']['verdict'] in ('ahead', 'tie', 'behind')
      decode = families.Decode(tuple(map(tuple, row['widths'])), row['cache'])
      picked.add(f"{row['model']}_{decode.name}.json")
  assert test_rows == picked | {'nested_1x12_nocache.json'}
  assert report['baseline']['flop_ratio'] == 1
  ceiling = report['tokenizer_reconstructions_of_held_out']
  assert 0 <= ceiling['class_accuracy'] <= 1 and ceiling['fd'] >= 0
  assert 0 < ceiling['reconstruction_mse'] < 4  # pixels in [-1, 1]
  for name in ('results.json', 'results.md', 'fd_vs_gflops.png'):
    assert io_utils.exists(io_utils.join(workdir, 'frontier', name))


def test_bad_api_input_gets_one_clear_error(mnist_tiny_job, tmp_path):
  workdir = mnist_tiny_job.workdir
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
