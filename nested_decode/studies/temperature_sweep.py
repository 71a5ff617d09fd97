"""``--mode=tune_temperature``: frame prediction's sampling temperature, chosen on validation clips.

The sampler draws each token from the model's softmax at ``sampling.temperature``. This mode
decodes ``eval.temperature_sweep.num_clips`` validation clips (``sources.validation_split``: clips
neither the transformer trained on nor the test set holds) from their condition frames with the
baseline and every configured schedule at each of ``eval.temperature_sweep.temperatures``, and
scores each set as the eval does (FVD against the validation clips, PSNR and SSIM of the
predicted frames), beside repeating the last condition frame. The temperature of the baseline's
lowest FVD is ``chosen``, the value to set as ``sampling.temperature``; the test set is never
decoded. A workdir without a trained tokenizer and transformer trains them first, as the job
does. Writes ``DIR/temperature_sweep/results.json``, ``results.md`` and
``fvd_vs_temperature.png``.
"""

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from nested_decode import api, config_lib, io_utils, tasks
from nested_decode.data import pipeline
from nested_decode.data.sources import validation_split
from nested_decode.metrics import frames, frechet, fvd, paired
from nested_decode.pipeline import stages, video
from nested_decode.writers import figures


class ValidationScorer:
  """Scores clip sets against the validation clips they continue, like ``pipeline.video``."""

  def __init__(self, config: ml_collections.ConfigDict, real: np.ndarray):
    self.config, self.real = config, real
    self.given = config.task.condition_frames
    self.i3d = fvd.default_features()
    self.real_features = self.features(real)

  def features(self, clips: np.ndarray) -> np.ndarray:
    return self.i3d(video.resize_for_fvd(clips, self.config.eval.fvd_image_size))

  def fvd(self, features: np.ndarray) -> float:
    return float(frechet.frechet_distance_from_features(features, self.real_features))

  def score(self, clips: np.ndarray, reference: np.ndarray | None = None
            ) -> tuple[dict, np.ndarray]:
    """``(row, features)``: FVD, PSNR and SSIM of ``clips`` and, given the ``reference`` set's
    features, the paired bootstrap FVD gap to it with its standard error; their I3D features."""
    features = self.features(clips)
    per_frame = frames.frame_scores(clips, self.real)
    row = dict(fvd=self.fvd(features),
               **{name: float(values[:, self.given:].mean())
                  for name, values in per_frame.items()})
    if reference is not None:
      gap = lambda rows: (frechet.frechet_distance_from_features(features[rows],
                                                                 self.real_features[rows])
                          - frechet.frechet_distance_from_features(reference[rows],
                                                                   self.real_features[rows]))
      row['fvd_minus_copy_last'], row['fvd_minus_copy_last_se'] = paired.bootstrap_difference(
          gap, [len(clips)], video.BOOTSTRAP_RESAMPLES)
    return row, features


def check_sweep(config: ml_collections.ConfigDict) -> None:
  if not tasks.task_of(config).num_given:
    raise config_lib.ConfigError('--mode=tune_temperature scores frame prediction; '
                                 f'config.task.name is {tasks.task_of(config).name!r}')
  sweep = config.eval.temperature_sweep
  if not sweep.temperatures or any(t <= 0 for t in sweep.temperatures):
    raise config_lib.ConfigError('config.eval.temperature_sweep.temperatures='
                                 f'{tuple(sweep.temperatures)}: must be positive, at least one')
  if sweep.num_clips < 2:
    raise config_lib.ConfigError(f'config.eval.temperature_sweep.num_clips={sweep.num_clips}: '
                                 'FVD needs at least 2 clips')


def run_temperature_sweep(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh) -> dict:
  check_sweep(config)
  sweep = config.eval.temperature_sweep
  source, transform = validation_split(config, sweep.num_clips)
  real = pipeline.examples_at(source, np.arange(sweep.num_clips), transform)['video']
  scorer = ValidationScorer(config, real)
  copy_last, copy_features = scorer.score(video.repeat_last_frame(real, scorer.given))
  logging.info('validation, repeating the last condition frame: %s', copy_last)
  trained = stages.generator(config, workdir, mesh)
  rows = []
  for temperature in sweep.temperatures:
    swept = ml_collections.ConfigDict(config.to_dict())
    swept.sampling.temperature = float(temperature)
    generator = api.Generator(swept, trained.tokenizer_params, trained.transformer_params, mesh,
                              trained.transformer_weights)
    for name in config_lib.schedules_with_baseline(config):
      samples = generator.predict_frames(real[:, :scorer.given], schedule=name, seed=config.seed)
      row, _ = scorer.score(samples.images, copy_features)
      rows.append(dict(temperature=float(temperature), schedule=name,
                       flop_ratio=samples.flop_ratio, **row))
      logging.info('temperature sweep: %s', rows[-1])
  baseline = [row for row in rows if row['schedule'] == 'baseline']
  chosen = min(baseline, key=lambda row: row['fvd'])['temperature']
  report = dict(chosen=chosen, num_clips=sweep.num_clips, validation=repr(source),
                repeat_last_condition_frame=copy_last, rows=rows)
  out_dir = io_utils.join(workdir, 'temperature_sweep')
  if jax.process_index() == 0:
    io_utils.write_json(io_utils.join(out_dir, 'results.json'), report)
    io_utils.write_text(io_utils.join(out_dir, 'results.md'), markdown(report))
    save_plot(io_utils.join(out_dir, 'fvd_vs_temperature.png'), report)
  return report


def markdown(report: dict) -> str:
  copy = report['repeat_last_condition_frame']
  lines = [f"Validation FVD over {report['num_clips']} clips ({report['validation']}); "
           f"repeating the last condition frame: FVD {copy['fvd']:.1f}, PSNR {copy['psnr']:.2f}, "
           f"SSIM {copy['ssim']:.3f}. Chosen temperature (the baseline's lowest FVD): "
           f"{report['chosen']:g}.", '',
           '| temperature | schedule | flop_ratio | fvd | fvd − copy-last | psnr | ssim |',
           '| --- | --- | --- | --- | --- | --- | --- |']
  for row in report['rows']:
    lines.append(f"| {row['temperature']:g} | {row['schedule']} | {row['flop_ratio']:.2f} | "
                 f"{row['fvd']:.1f} | {row['fvd_minus_copy_last']:+.1f} ± "
                 f"{row['fvd_minus_copy_last_se']:.1f} | {row['psnr']:.2f} | {row['ssim']:.3f} |")
  return '\n'.join(lines) + '\n'


def save_plot(path: str, report: dict) -> None:
  plt = figures.pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for name in dict.fromkeys(row['schedule'] for row in report['rows']):
    rows = [row for row in report['rows'] if row['schedule'] == name]
    ax.plot([r['temperature'] for r in rows], [r['fvd'] for r in rows], '-o', label=name)
  ax.axhline(report['repeat_last_condition_frame']['fvd'], color='gray', linestyle='--',
             label='repeat last condition frame')
  ax.set_xlabel('sampling temperature')
  ax.set_ylabel(f"validation FVD ({report['num_clips']} clips)")
  ax.legend(fontsize=8)
  figures.save_png(fig, path)
