"""The video frame-prediction job end to end (Moving MNIST, real I3D) and its GIF writer."""

import json
import os
import subprocess
import sys

import nbclient
import nbformat
import numpy as np
import pytest
from conftest import ROOT, load_config
from PIL import Image

from nested_decode import api, config_lib, parallel
from nested_decode.data import pipeline, sources
from nested_decode.data.clips import FirstClip
from nested_decode.metrics import frames, frechet
from nested_decode.pipeline import video
from nested_decode.writers import video_writer


def test_comparison_gif_frames_mark_given_and_generated_frames(tmp_path):
  videos = np.random.default_rng(0).integers(0, 255, (2, 6, 8, 8, 1), dtype=np.uint8)
  path = tmp_path / 'comparison.gif'
  video_writer.save_comparison_gif(str(path), {'real': videos, 'magnets': videos[::-1]},
                                   given_frames=2)
  assert Image.open(path).n_frames == 6
  gif_frames = video_writer.comparison_frames({'real': videos}, given_frames=2)
  margin = video_writer.MARGIN
  border_pixel = lambda image: image.getpixel((margin, image.size[1] - 1 - margin))
  assert [border_pixel(f) for f in gif_frames] == (
      [video_writer.GIVEN_COLOR] * 2 + [video_writer.GENERATED_COLOR] * 4)


# configs/k600.py:tiny shrunk for the suite (its tokenizer is the repository's trained one; its
# one-layer transformer starts from a random initialisation, not the shipped 4-layer weights).
JOB_OVERRIDES = ['--config.training.num_steps=3', '--config.training.init_from=',
                 '--config.data.num_train_clips=32', '--config.data.num_eval_clips=4',
                 '--config.eval.num_samples=2', '--config.eval.num_folds=2',
                 '--config.eval.batch_size=4',
                 '--config.eval.saved_clips=4', '--config.eval.gif_clips=2',
                 '--config.model.num_layers=1',
                 # cached steps padded to 4 query buckets: the decodes share a few programs
                 '--config.sampling.query_buckets=4']


def run_main(*args):
  return subprocess.run([sys.executable, '-m', 'nested_decode.main', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)


@pytest.fixture(scope='module')
def frame_prediction_job(tmp_path_factory):
  """``configs/k600.py:tiny`` shrunk by overrides, run as users run it: its workdir and log."""
  workdir = tmp_path_factory.mktemp('k600_tiny')
  result = run_main('--config=configs/k600.py:tiny', f'--workdir={workdir}', *JOB_OVERRIDES)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result.stderr


def test_frame_prediction_job_writes_fvd_rows_and_keeps_the_condition(frame_prediction_job):
  tmp_path, stderr = frame_prediction_job
  assert 'Sampled 4 clips with schedule magnets' in stderr
  report = json.loads((tmp_path / 'eval.json').read_text())
  rows = {row['schedule']: row for row in report['rows']}
  assert set(rows) == {'baseline', 'magnets', 'fewer_steps_4x', 'fewer_steps_6x'}
  assert report['task'] == 'frame_prediction'
  for row in rows.values():
    assert row['num_clips'] == 4 and np.isfinite(row['fvd']) and row['fvd'] >= 0
    assert row['num_folds'] == 2 and row['fvd_std'] > 0  # two folds of 2 clips each
  assert rows['magnets']['flop_ratio'] > 3
  assert 'fvd_minus_baseline' not in rows['baseline']
  for name in ('magnets', 'fewer_steps_4x', 'fewer_steps_6x'):  # paired gaps to the baseline
    row = rows[name]
    assert row['fvd_minus_baseline'] == pytest.approx(row['fvd'] - rows['baseline']['fvd'])
    assert row['fvd_minus_baseline_se'] > 0 and np.isfinite(row['psnr_minus_baseline_se'])
    assert row['psnr_minus_baseline'] == pytest.approx(row['psnr'] - rows['baseline']['psnr'])
  # every step of an uncached full-width decode is the same pass: 12 steps against 3 and 2
  assert rows['fewer_steps_4x']['flop_ratio'] == pytest.approx(4)
  assert rows['fewer_steps_6x']['flop_ratio'] == pytest.approx(6)
  assert set(report['reference_fvd']) == {'tokenizer_reconstruction',
                                          'repeat_last_condition_frame'}
  assert set(report['reference_minus_baseline']) == set(report['reference_fvd'])
  for name, gaps in report['reference_minus_baseline'].items():  # the same clips, paired
    assert gaps['fvd_minus_baseline'] == pytest.approx(
        report['reference_fvd'][name] - rows['baseline']['fvd'])
    assert gaps['fvd_minus_baseline_se'] > 0 and gaps['ssim_minus_baseline_se'] > 0

  samples = tmp_path / 'samples'
  load = lambda name: np.load(samples / f'{name}.npz')['videos']
  baseline, magnets, real = load('baseline'), load('magnets'), load('real')
  assert baseline.shape == real.shape == (4, 16, 32, 32, 1) and baseline.dtype == np.uint8
  # The causal tokenizer decodes the 5 condition frames from the given latent frames alone, so
  # every schedule shows the same condition frames: sampling never touched those tokens.
  np.testing.assert_array_equal(baseline[:, :5], magnets[:, :5])
  assert np.any(baseline[:, 5:] != magnets[:, 5:])
  assert Image.open(samples / 'comparison.gif').n_frames == 16

  # PSNR and SSIM pair each sample with the real clip it continues: all 4 clips are saved, so
  # the report's scores can be recomputed from them.
  metrics = report['frame_metrics']
  assert set(metrics) == {'baseline', 'magnets', 'fewer_steps_4x', 'fewer_steps_6x',
                          'tokenizer_reconstruction', 'repeat_last_condition_frame'}
  for name, clips in (('baseline', baseline), ('magnets', magnets)):
    scores = frames.frame_scores(clips, real)
    assert rows[name]['psnr'] == metrics[name]['psnr'] == pytest.approx(
        scores['psnr'][:, 5:].mean())
    assert metrics[name]['ssim_per_frame'] == pytest.approx(scores['ssim'].mean(0).tolist())
  # The condition frames decode from the given tokens alone, as in the reconstructions, and
  # copy-last repeats them exactly.
  assert metrics['tokenizer_reconstruction']['psnr_per_frame'][:5] == pytest.approx(
      metrics['baseline']['psnr_per_frame'][:5])
  assert metrics['repeat_last_condition_frame']['psnr_per_frame'][:5] == [None] * 5
  assert Image.open(tmp_path / 'frame_metrics.png').size[0] > 600

  # The API loads the workdir and, given the real condition frames, predicts the clips the
  # job sampled: the job decodes through it, and the causal tokenizer's condition latents do not
  # depend on the frames after them.
  model = api.load(str(tmp_path))
  config = model.config
  for name, job_clips in (('baseline', baseline), ('magnets', magnets)):
    predicted = model.predict_frames(real[:, :5], schedule=name, seed=config.seed,
                                     batch_size=config.eval.batch_size)
    np.testing.assert_array_equal(predicted.images, job_clips)

  sampled = lambda: {path.name: path.stat().st_mtime_ns for path in samples.glob('*.npz')}
  written = sampled()
  # The job again, resumed.
  assert video.eval_stage(config, str(tmp_path), parallel.make_mesh(config)) == report['rows']
  assert sampled() == written  # finished schedules are read back, not sampled again


def test_the_job_trains_its_own_video_tokenizer_when_given_none(tmp_path):
  """``tokenizer_training.pretrained=''``: the causal 3D tokenizer trains in the workdir."""
  result = run_main('--config=configs/k600.py:tiny', f'--workdir={tmp_path}',
                    '--mode=train_tokenizer', '--config.tokenizer_training.pretrained=',
                    '--config.tokenizer_training.num_steps=2', *JOB_OVERRIDES)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = (tmp_path / 'tokenizer_metrics.jsonl').read_text().splitlines()
  assert json.loads(lines[-1])['step'] == 2 and np.isfinite(json.loads(lines[-1])['loss'])
  assert (tmp_path / 'tokenizer').is_dir()


def test_the_job_starts_its_transformer_from_the_shipped_weights(tmp_path):
  """The config's ``training.init_from`` is the repository's transformer, trained on the
  repository's tokenizer's tokens: the job's first step starts from it, its loss far under a
  random initialisation's (about ln 256 = 5.5 nats)."""
  result = run_main('--config=configs/k600.py:tiny', f'--workdir={tmp_path}', '--mode=train',
                    '--config.training.num_steps=1', '--config.data.num_train_clips=16',
                    '--config.eval.batch_size=8')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Starting the transformer from' in result.stderr
  (row,) = map(json.loads, (tmp_path / 'transformer_metrics.jsonl').read_text().splitlines())
  assert row['loss/p1'] < 4.5, row


def test_the_tokenizer_alone_scores_what_the_job_scored_its_reconstructions(
    frame_prediction_job):
  """``--mode=eval_tokenizer`` on the job's workdir: its reconstructions of the real clips are
  the job's reference reconstructions (the same clips through the same tokenizer)."""
  workdir = frame_prediction_job[0]
  result = run_main('--config=configs/k600.py:tiny', f'--workdir={workdir}',
                    '--mode=eval_tokenizer', *JOB_OVERRIDES)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((workdir / 'tokenizer_eval.json').read_text())
  job = json.loads((workdir / 'eval.json').read_text())
  shipped = load_config('k600', 'tiny').tokenizer_training.pretrained
  assert report['pretrained_tokenizer'] == shipped and report['num_clips'] == 4
  reconstructions = report['reconstruction_of_real']
  assert reconstructions['psnr_per_frame'] == pytest.approx(
      job['frame_metrics']['tokenizer_reconstruction']['psnr_per_frame'])
  assert reconstructions['fvd'] == pytest.approx(job['reference_fvd']['tokenizer_reconstruction'])
  assert report['repeat_last_condition_frame']['psnr_per_frame'][:5] == [None] * 5
  assert list(report['other_split_clips']) == ['fvd'] and report['other_split_clips']['fvd'] > 0
  assert Image.open(workdir / 'tokenizer_frame_metrics.png').size[0] > 600

  image = run_main('--config=configs/mnist.py:tiny', f'--workdir={workdir}_mnist',
                   '--mode=eval_tokenizer')
  assert image.returncode != 0 and 'scores video tokenizers' in image.stderr


def test_the_temperature_is_chosen_on_validation_clips(frame_prediction_job):
  """``--mode=tune_temperature`` decodes every schedule at each temperature on validation clips
  (the training digits' clips after the training set's) and picks the baseline's best."""
  workdir = frame_prediction_job[0]
  result = run_main('--config=configs/k600.py:tiny', f'--workdir={workdir}',
                    '--mode=tune_temperature', *JOB_OVERRIDES,
                    '--config.eval.temperature_sweep.temperatures=(1.0,0.3)',
                    '--config.eval.temperature_sweep.num_clips=4')
  assert result.returncode == 0, result.stderr[-3000:]
  out = workdir / 'temperature_sweep'
  report = json.loads((out / 'results.json').read_text())
  rows = {(row['temperature'], row['schedule']): row for row in report['rows']}
  assert set(rows) == {(t, name) for t in (1.0, 0.3)
                       for name in ('baseline', 'magnets', 'fewer_steps_4x', 'fewer_steps_6x')}
  baseline_fvd = {t: rows[t, 'baseline']['fvd'] for t in (1.0, 0.3)}
  assert report['chosen'] == min(baseline_fvd, key=baseline_fvd.get)
  assert f"--config.sampling.temperature={report['chosen']:g}" in result.stdout
  assert report['validation'] == 'ArraySource(moving_mnist/validation/clips32-36, n=4)'
  assert all(np.isfinite(row['fvd_minus_copy_last_se']) for row in rows.values())
  assert (out / 'results.md').read_text().count('| baseline |') == 2
  assert Image.open(out / 'fvd_vs_temperature.png').size[0] > 400

  # A row is the clips the API predicts from the validation clips at that temperature.
  config = api.load(str(workdir)).config
  config.sampling.temperature = 0.3
  model = api.load(str(workdir), config)
  source, transform = sources.validation_split(config, 4)
  real = pipeline.examples_at(source, np.arange(4), transform)['video']
  predicted = model.predict_frames(real[:, :5], schedule='magnets', seed=config.seed)
  assert rows[0.3, 'magnets']['psnr'] == pytest.approx(
      frames.frame_scores(predicted.images, real)['psnr'][:, 5:].mean())
  assert rows[0.3, 'magnets']['psnr'] != rows[1.0, 'magnets']['psnr']


def test_the_demo_notebook_runs_top_to_bottom(frame_prediction_job):
  """``notebooks/demo.ipynb`` with its smallest setting (and this file's video workdir), as
  Jupyter runs it: any cell error fails the test."""
  notebook = nbformat.read(os.path.join(ROOT, 'notebooks', 'demo.ipynb'), as_version=4)
  parameters = next(c for c in notebook.cells if 'parameters' in c.metadata.get('tags', []))
  parameters.source += (f"\nSAMPLES_PER_DIGIT = 2\nQUALITY_SAMPLES = 20\n"
                        f"VIDEO_WORKDIR = {str(frame_prediction_job[0])!r}\n")
  nbclient.NotebookClient(notebook, timeout=300, kernel_name='python3', resources={
      'metadata': {'path': os.path.join(ROOT, 'notebooks')}}).execute()
  outputs = [o for c in notebook.cells if c.cell_type == 'code' for o in c.outputs]
  text = ''.join(o.get('text', '') for o in outputs)
  assert 'First samples after' in text and 'MaGNeTS 4x1,1x4 minus the best other family' in text
  assert 'fewer steps  1x3' in text  # the frontier's pick at the notebook's budget, scored live
  images = [o for o in outputs if 'image/png' in o.get('data', {})]
  assert len(images) == 4  # side by side, step by step, your schedule, quality vs GFLOPs
  assert any('image/gif' in o.get('data', {}) for o in outputs)  # the frame prediction


# ---- the FVD protocol's pieces ----

def test_fold_fvd_scores_each_fold_against_its_real_fold():
  rng = np.random.default_rng(0)
  samples, real = rng.normal(size=(12, 5)), rng.normal(size=(12, 5)) + 1
  mean, std = video.fold_fvd(samples, real, 3)
  folds = [frechet.frechet_distance_from_features(samples[i:i + 4], real[i:i + 4])
           for i in (0, 4, 8)]
  assert (mean, std) == pytest.approx((np.mean(folds), np.std(folds)))
  assert video.fold_fvd(samples, real, 1) == pytest.approx(
      (frechet.frechet_distance_from_features(samples, real), 0.0))


def test_samples_pair_with_real_clips_and_wrap_across_folds():
  config = load_config('k600')
  config.eval.update(num_samples=5, num_folds=3)
  np.testing.assert_array_equal(video.real_indices(config, 7),
                                [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5, 6, 0])
  with pytest.raises(ValueError, match=r"num_samples=5 but the real clips \(config.eval."
                     r"real_split='eval' with clip_views=\(2, 3\)\) number 4"):
    video.real_indices(config, 4)
  tokens, labels = np.arange(7)[:, None] * np.ones((1, 3), int), np.zeros(7, np.int32)
  _, given = video.condition(config, tokens, labels, real_labels=None)
  np.testing.assert_array_equal(given[:, 0], video.real_indices(config, 7))


def test_class_conditional_samples_take_their_real_clips_classes():
  config = load_config('ucf101', 'tiny')
  real_labels = np.array([5, 5, 17, 100], np.int32)
  labels, given = video.condition(config, None, None, real_labels)
  assert given is None
  np.testing.assert_array_equal(labels, real_labels)


def test_paper_configs_follow_magvit_protocols():
  k600, ucf = load_config('k600'), load_config('ucf101')
  assert (k600.eval.num_samples, k600.eval.num_folds, tuple(k600.eval.clip_views),
          k600.eval.fvd_image_size, k600.eval.real_split) == (50_000, 4, (2, 3), 64, 'eval')
  assert not k600.eval.frame_metrics and load_config('k600', 'tiny').eval.frame_metrics
  assert video.paired_real_clips(k600, None) is None
  assert (ucf.eval.num_samples, ucf.eval.num_folds, tuple(ucf.eval.clip_views),
          ucf.eval.real_split) == (10_000, 4, (2, 3), 'train')
  k600.eval.real_split = 'train'
  with pytest.raises(config_lib.ConfigError, match="eval.real_split='train'.*frame prediction"):
    config_lib.validate(k600)


def test_clips_are_resized_for_fvd():
  clips = np.full((2, 3, 128, 128, 3), 200, np.uint8)
  resized = video.resize_for_fvd(clips, 64)
  assert resized.shape == (2, 3, 64, 64, 3) and resized.dtype == np.uint8
  assert (resized == 200).all()
  assert video.resize_for_fvd(clips, 0) is clips


def valid_clips(batches):
  return np.concatenate([videos[share.valid] for share, videos, _ in batches()])


def test_the_fvd_floor_scores_clips_of_the_other_split_cut_as_the_real_ones():
  config = load_config('k600', 'tiny')
  config.data.update(num_train_clips=6, num_eval_clips=4)
  config.eval.update(num_samples=2, num_folds=2, batch_size=3)
  mesh = parallel.make_mesh(config)
  clips = valid_clips(video.other_split_clips(config, mesh))
  train, evaluation, _, transform = video.data_sources(config)
  expected = video.pipeline.examples_at(train, np.arange(4), transform)['video']
  np.testing.assert_array_equal(clips, expected)
  assert clips.shape == (4, 16, 32, 32, 1)
  held_out = video.pipeline.examples_at(evaluation, np.arange(4), transform)['video']
  assert not any((clip == other).all() for clip in clips for other in held_out)
  config.data.num_train_clips = 3
  with pytest.raises(ValueError, match=r'training split has 3 clips; the FVD floor needs 4'):
    video.other_split_clips(config, mesh)


def test_where_the_real_clips_are_training_clips_the_floor_takes_held_out_ones(monkeypatch):
  config = load_config('ucf101', 'tiny')
  assert config.eval.real_split == 'train'
  config.eval.update(num_samples=4, batch_size=3, clip_views=(1, 2))
  # Two splits told apart by their pixels: 10 in the training videos, 200 in the held-out ones.
  videos = lambda value: np.full((3, 16, 32, 32, 3), value, np.uint8)
  splits = [video.pipeline.ArraySource(name, video=videos(value), label=np.zeros(3, np.int32))
            for name, value in (('train', 10), ('eval', 200))]
  transform = FirstClip(16, 1, 32)
  monkeypatch.setattr(video, 'data_sources', lambda config: (*splits, None, transform))
  clips = valid_clips(video.other_split_clips(config, parallel.make_mesh(config)))
  assert clips.shape == (4, 16, 32, 32, 3) and (clips == 200).all()
