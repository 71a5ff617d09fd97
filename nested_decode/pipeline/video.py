"""Sampling and FVD evaluation of the video tasks (frame prediction, class-conditional video).

The protocol is the config's (``eval.*``; MAGVIT's for the paper configs, see the README): the
real clips are the ``eval.real_split`` split's videos, ``eval.clip_views`` clips of each
(temporal windows x spatial crops), and sample ``i`` pairs with real clip ``i`` (wrapping when
``num_samples x num_folds`` clips outnumber them): frame prediction continues that clip from its
condition frames (its given tokens are the tokenizer's tokens of them), a class-conditional
sample takes its class. The real clips go through I3D first, then each schedule's clips, in
batches, so memory does not grow with the number of samples: ``samples/<name>_i3d.npz`` keeps
the features (a finished set is skipped when the job is resumed) and ``samples/<name>.npz`` the
first ``eval.saved_clips`` clips. Clips are resized to ``eval.fvd_image_size`` before I3D.

``eval.json`` rows: ``fvd`` (mean over the ``eval.num_folds`` folds of ``eval.num_samples`` clips,
each against its fold of real clips) and ``fvd_std``, with ``gflops_per_sample`` and
``flop_ratio``; each schedule's but the baseline's also its paired gaps to the baseline with
their standard errors (``fvd_minus_baseline`` and ``fvd_minus_baseline_se``, a bootstrap over
the clips; ``gaps_to_baseline``). For scale it also scores the tokenizer's reconstructions of
the held-out clips (the ceiling any sampler can reach through this tokenizer) and, for frame
prediction, repeating the last condition frame (a model that learned nothing), each with its
paired gaps to the baseline's clips (``reference_minus_baseline``, the reference's score minus
the baseline's: a positive FVD gap says the baseline is better).

Frame prediction also scores every set's frames against the real clips they continue: rows
carry ``psnr`` and ``ssim`` (``metrics.frames``, means over clips and the predicted frames),
``eval.json``'s ``frame_metrics`` those and their per-frame means for each set and reference,
and ``frame_metrics.png`` plots them frame by frame.
"""

from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from nested_decode import api, config_lib, io_utils, parallel, tasks
from nested_decode.data import clip_views, pipeline
from nested_decode.data.sources import data_sources
from nested_decode.inference import decode_cost, tokenizer, tokenizer_file
from nested_decode.metrics import frames, frechet, fvd, paired
from nested_decode.pipeline import stages
from nested_decode.writers import frame_metrics_plot, video_writer

# Draws of the paired bootstrap of each schedule's FVD gap to the baseline (gaps_to_baseline).
BOOTSTRAP_RESAMPLES = 100
ClipBatches = Callable[[], Iterator[tuple[parallel.RowShare, np.ndarray, np.ndarray | None]]]


def total_clips(config: ml_collections.ConfigDict) -> int:
  """Clips per set: ``eval.num_samples`` in each of ``eval.num_folds`` folds."""
  return config.eval.num_samples * config.eval.num_folds


def real_source(config: ml_collections.ConfigDict):
  """``(source, transform)`` of the real clips: the ``eval.real_split`` split's videos, each
  giving ``eval.clip_views`` clips (the eval split arrives wrapped from ``data_sources``)."""
  train, evaluation, _, eval_transform = data_sources(config)
  if config.eval.real_split == 'train':
    return clip_views.ClipViews(train, *config.eval.clip_views), eval_transform
  return evaluation, eval_transform


def real_indices(config: ml_collections.ConfigDict, available: int) -> np.ndarray:
  """Which real clip each of the ``total_clips`` samples pairs with: clip ``i`` for sample ``i``,
  wrapping around when the folds together need more clips than there are (each fold's clips
  stay distinct)."""
  check_num_samples(config, available)
  return np.arange(total_clips(config)) % available


def real_clips(config: ml_collections.ConfigDict, mesh: Mesh) -> Iterator[
    tuple[parallel.RowShare, np.ndarray, np.ndarray]]:
  """The real clips in order, as uint8 videos with their labels: per global batch, this
  process's share of the rows and its clips of them."""
  source, transform = real_source(config)
  indices = real_indices(config, len(source))
  for share in parallel.row_shares(len(indices), config.eval.batch_size, mesh):
    batch = pipeline.examples_at(source, indices[share.rows], transform)
    yield share, batch['video'], batch['label']


def other_split_clips(config: ml_collections.ConfigDict, mesh: Mesh) -> ClipBatches:
  """As many real clips as the FVD's real clips, from the other split (the training split's
  first videos, or the held-out ones where ``eval.real_split='train'``), cut as the real clips
  are (``eval.clip_views``): their FVD against the real clips is the floor of FVD at this
  number of clips, what a perfect model would score."""
  train, evaluation, _, eval_transform = data_sources(config)
  from_eval = config.eval.real_split == 'train'
  videos = evaluation if from_eval else train
  if tuple(config.eval.clip_views) != (1, 1):  # data_sources cuts views of the real split only
    videos = clip_views.ClipViews(videos, *config.eval.clip_views)
  count = total_clips(config)
  if len(videos) < count:
    raise ValueError(f'The {"held-out" if from_eval else "training"} split has {len(videos)} '
                     f'clips; the FVD floor needs {count} (config.eval.num_samples x '
                     'config.eval.num_folds)')

  def batches():
    for share in parallel.row_shares(count, config.eval.batch_size, mesh):
      yield share, pipeline.examples_at(videos, share.rows, eval_transform)['video'], None
  return batches


def check_num_samples(config: ml_collections.ConfigDict, available: int) -> None:
  if config.eval.num_samples > available:
    raise ValueError(f'config.eval.num_samples={config.eval.num_samples} but the real clips '
                     f'(config.eval.real_split={config.eval.real_split!r} with clip_views='
                     f'{tuple(config.eval.clip_views)}) number {available}')


def condition(config: ml_collections.ConfigDict, eval_tokens: np.ndarray,
              eval_labels: np.ndarray, real_labels: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray | None]:
  """``(labels, given_tokens or None)`` of the ``total_clips`` samples: frame prediction
  continues the real clip each sample pairs with (its tokens are the eval split's); a
  class-conditional sample takes its real clip's class."""
  if tasks.task_of(config).num_given == 0:
    return np.asarray(real_labels, np.int32), None
  indices = real_indices(config, len(eval_tokens))
  return eval_labels[indices], eval_tokens[indices]


def features_path(workdir: str, name: str) -> str:
  return io_utils.join(workdir, 'samples', f'{name}_i3d.npz')


def resize_for_fvd(videos: np.ndarray, size: int) -> np.ndarray:
  """uint8 clips with square frames resized (bilinear) to ``size`` (0: unchanged)."""
  if not size or videos.shape[2:4] == (size, size):
    return videos
  resized = jax.image.resize(jnp.asarray(videos, jnp.float32),
                             videos.shape[:2] + (size, size, videos.shape[-1]), 'bilinear',
                             antialias=False)
  return np.asarray(jnp.clip(jnp.round(resized), 0, 255).astype(jnp.uint8))


def streamed_features(path: str, batches: ClipBatches, saved_clips: int,
                      i3d: fvd.I3DFeatures, fvd_image_size: int = 0,
                      real: ClipBatches | None = None) -> dict[str, np.ndarray]:
  """``{'features'}`` (I3D, of the clips ``batches`` yields, at ``fvd_image_size``) and, when the
  batches carry them, ``'labels'``; with ``real`` (the real clips, in the same batches), also
  ``'psnr'`` and ``'ssim'`` ``[N, T]`` of each clip against its real one. Each process computes
  its rows and all are gathered. Stored at ``path`` (and read from it when present); the first
  ``saved_clips`` clips also go to ``path`` without the ``_i3d`` suffix."""
  if io_utils.exists(path):
    return io_utils.load_npz(path)
  features, labels, kept = [], [], []
  scores = {'psnr': [], 'ssim': []}
  real_batches = real() if real is not None else None
  for share, videos, batch_labels in batches():
    features.append(parallel.gather_share(i3d(resize_for_fvd(videos, fvd_image_size)), share))
    if batch_labels is not None:
      labels.append(parallel.gather_share(batch_labels, share))
    if real_batches is not None:
      real_share, real_videos, _ = next(real_batches)
      if not np.array_equal(real_share.rows, share.rows):
        raise ValueError(f'{path}: clips of rows {share.rows} met real clips of rows '
                         f'{real_share.rows}')
      for name, values in frames.frame_scores(videos, real_videos).items():
        scores[name].append(parallel.gather_share(values, share))
    if sum(len(k) for k in kept) < saved_clips:
      kept.append(parallel.gather_share(videos, share))
  result = {'features': np.concatenate(features)}
  if labels:
    result['labels'] = np.concatenate(labels)
  if real is not None:
    result.update({name: np.concatenate(values) for name, values in scores.items()})
  if jax.process_index() == 0:
    if saved_clips:
      io_utils.write_npz(path.replace('_i3d.npz', '.npz'),
                         videos=np.concatenate(kept)[:saved_clips])
    io_utils.write_npz(path, **result)
  return result


def schedule_clips(generator: api.Generator, name: str, labels: np.ndarray,
                   given: np.ndarray | None) -> ClipBatches:
  """A fresh iterator over the uint8 clips schedule ``name`` decodes, batch by batch."""
  config = generator.config

  def batches():
    for share, output in generator.token_batches(generator.schedule(name), labels, config.seed,
                                                 given):
      yield share, tokenizer.decode_tokens(config, generator.tokenizer_params, output['tokens'],
                                           generator.mesh), None
    logging.info('Sampled %d clips with schedule %s', len(labels), name)
  return batches


def sample_stage(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh
                 ) -> dict[str, np.ndarray]:
  """The real clips and, per schedule and the baseline, the I3D features of its clips, and the
  comparison GIF."""
  return sample_with(config, workdir, stages.generator(config, workdir, mesh),
                     stages.token_dataset(config, workdir, 'eval', mesh), fvd.default_features())


def sample_with(config, workdir, generator, eval_token_dataset, i3d) -> dict[str, dict]:
  """Per clip set, ``streamed_features``' result: ``'real'`` first (its labels condition
  class-conditional samples), then each schedule's (for frame prediction with the PSNR and
  SSIM of its frames against the real clips it continues)."""
  saved, size = config.eval.saved_clips, config.eval.fvd_image_size
  real = streamed_features(features_path(workdir, 'real'),
                           lambda: real_clips(config, generator.mesh), saved, i3d, size)
  labels, given = condition(config, *eval_token_dataset, real['labels'])
  results = {}
  for name in config_lib.schedules_with_baseline(config):
    results[name] = streamed_features(
        features_path(workdir, name), schedule_clips(generator, name, labels, given), saved,
        i3d, size, paired_real_clips(config, generator.mesh))
  results['real'] = real
  if jax.process_index() == 0:
    write_comparison_gif(config, workdir)
  return results


def paired_real_clips(config: ml_collections.ConfigDict, mesh: Mesh) -> ClipBatches | None:
  """For frame prediction with ``eval.frame_metrics``, the real clips sample ``i`` continues,
  to score its frames against (None otherwise; a task without given frames has no real
  counterpart of a sample). Configs saved before the key existed read it as on."""
  if not tasks.task_of(config).num_given or not config.eval.get('frame_metrics', True):
    return None
  return lambda: real_clips(config, mesh)


def saved_videos(workdir: str, name: str) -> np.ndarray:
  return io_utils.load_npz(io_utils.join(workdir, 'samples', f'{name}.npz'))['videos']


def write_comparison_gif(config: ml_collections.ConfigDict, workdir: str) -> None:
  """``samples/comparison.gif``: real clips | baseline | each schedule, condition frames framed
  in green and generated frames in red."""
  n = config.eval.gif_clips
  columns = {'real': saved_videos(workdir, 'real')[:n]}
  for name in config_lib.schedules_with_baseline(config):
    columns[name] = saved_videos(workdir, name)[:n]
  given = config.task.condition_frames if tasks.task_of(config).num_given else 0
  video_writer.save_comparison_gif(io_utils.join(workdir, 'samples', 'comparison.gif'), columns,
                                   given_frames=given)


def reference_batches(config, generator, eval_tokens) -> dict[str, ClipBatches]:
  """Clip sets that put the samples' FVD in context (see the module docstring). For frame
  prediction the reconstructions are of the clips the samples continue, in the same order."""
  mesh = generator.mesh
  if tasks.task_of(config).num_given:
    tokens = eval_tokens[real_indices(config, len(eval_tokens))]
  else:
    tokens = eval_tokens[:total_clips(config)]

  def reconstructions():
    for share in parallel.row_shares(len(tokens), config.eval.batch_size, mesh):
      yield share, tokenizer.decode_tokens(config, generator.tokenizer_params,
                                           share.take(tokens), mesh), None

  references = {'tokenizer_reconstruction': reconstructions}
  if tasks.task_of(config).num_given:
    references['repeat_last_condition_frame'] = repeated_last_condition_frame(config, mesh)
  return references


def repeated_last_condition_frame(config: ml_collections.ConfigDict, mesh: Mesh) -> ClipBatches:
  """The real clips with every frame after the condition replaced by the last condition frame:
  a frame predictor that learned nothing."""
  def batches():
    for share, videos, _ in real_clips(config, mesh):
      yield share, repeat_last_frame(videos, config.task.condition_frames), None
  return batches


def repeat_last_frame(videos: np.ndarray, given: int) -> np.ndarray:
  """Clips ``[N, T, ...]`` with every frame after the first ``given`` replaced by frame
  ``given - 1``."""
  return np.concatenate([videos[:, :given]] + [videos[:, given - 1:given]]
                        * (videos.shape[1] - given), axis=1)


def fold_fvd(features: np.ndarray, real: np.ndarray, num_folds: int) -> tuple[float, float]:
  """Mean and standard deviation over folds of the FVD of fold ``k`` of ``features`` against
  fold ``k`` of ``real`` (consecutive equal parts; a shorter set's folds are shorter)."""
  scores = [frechet.frechet_distance_from_features(a, b)
            for a, b in zip(np.array_split(features, num_folds),
                            np.array_split(real, num_folds))]
  return float(np.mean(scores)), float(np.std(scores))


def set_scores(result: dict[str, np.ndarray], real: np.ndarray,
               config: ml_collections.ConfigDict) -> tuple[float, float, dict | None]:
  """``(fvd, fvd_std, frame_metrics)`` of a clip set (``streamed_features``' result) against
  the real features: FVD over the folds and, when the set carries them, ``frames.summary`` of
  its PSNR and SSIM (else None)."""
  mean, std = fold_fvd(result['features'], real, config.eval.num_folds)
  summary = frames.summary(result, config.task.condition_frames) if 'psnr' in result else None
  return mean, std, summary


def gaps_to_baseline(result: dict[str, np.ndarray], baseline: dict[str, np.ndarray],
                     real: np.ndarray, config: ml_collections.ConfigDict) -> dict[str, float]:
  """A set's paired differences from the baseline's (both ``streamed_features``' results, clip
  ``i`` of each continuing or conditioned like real clip ``i``): ``fvd_minus_baseline`` and its
  bootstrap standard error ``fvd_minus_baseline_se`` (clips resampled within each fold, the same
  clips of both sets and of the real ones) and, for frame prediction, ``psnr_minus_baseline`` and
  ``ssim_minus_baseline`` (per-clip means over the predicted frames) with theirs. Empty when
  the sets do not pair up clip for clip with the real clips."""
  features, reference = result['features'], baseline['features']
  if not len(features) == len(reference) == len(real):
    return {}
  folds = config.eval.num_folds
  fold_sizes = [len(fold) for fold in np.array_split(real, folds)]
  fvd_gap = lambda rows: (fold_fvd(features[rows], real[rows], folds)[0]
                          - fold_fvd(reference[rows], real[rows], folds)[0])
  gaps = dict(zip(('fvd_minus_baseline', 'fvd_minus_baseline_se'),
                  paired.bootstrap_difference(fvd_gap, fold_sizes, BOOTSTRAP_RESAMPLES)))
  first = config.task.condition_frames
  for metric in ('psnr', 'ssim'):
    if metric in result and metric in baseline:
      gaps[f'{metric}_minus_baseline'], gaps[f'{metric}_minus_baseline_se'] = (
          paired.paired_difference(result[metric][:, first:].mean(axis=1),
                                   baseline[metric][:, first:].mean(axis=1)))
  return gaps


def save_frame_metrics(config: ml_collections.ConfigDict, path: str, summaries: dict) -> None:
  if summaries and jax.process_index() == 0:
    frame_metrics_plot.save_frame_metrics_plot(path, summaries, config.task.condition_frames)


def eval_stage(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh) -> list[dict]:
  """``eval.json``: per schedule GFLOPs and FVD against the real held-out clips (and, for frame
  prediction, PSNR and SSIM), the references' scores, and ``frame_metrics.png``."""
  i3d = fvd.default_features()
  generator = stages.generator(config, workdir, mesh)
  eval_tokens, eval_labels = stages.token_dataset(config, workdir, 'eval', mesh)
  results = sample_with(config, workdir, generator, (eval_tokens, eval_labels), i3d)
  real = results.pop('real')['features']
  flops = {row['schedule']: row for row in decode_cost.flops_rows(config)}
  frame_metrics = {}
  rows = []
  for name, result in results.items():
    row = {key: flops[name][key] for key in ('schedule', 'cache', 'steps', 'gflops_per_sample',
                                             'flop_ratio')}
    mean, std, summary = set_scores(result, real, config)
    row.update(fvd=mean, fvd_std=std, num_folds=config.eval.num_folds,
               num_clips=len(result['features']))
    if summary:
      frame_metrics[name] = summary
      row.update(psnr=summary['psnr'], ssim=summary['ssim'])
    if name != 'baseline':
      row.update(gaps_to_baseline(result, results['baseline'], real, config))
    rows.append(row)
    logging.info('eval %s: %s', name, row)
  references, reference_gaps = {}, {}
  for name, batches in reference_batches(config, generator, eval_tokens).items():
    reference = streamed_features(features_path(workdir, name), batches, 0, i3d,
                                  config.eval.fvd_image_size,
                                  paired_real_clips(config, generator.mesh))
    references[name], _, summary = set_scores(reference, real, config)
    if summary:
      frame_metrics[name] = summary
    # Paired clip for clip: does the baseline beat copy-last, how far is it from the ceiling?
    reference_gaps[name] = gaps_to_baseline(reference, results['baseline'], real, config)
  report = dict(rows=rows, reference_fvd=references, reference_minus_baseline=reference_gaps,
                num_real_clips=len(real), task=tasks.task_of(config).name)
  if frame_metrics:
    report['frame_metrics'] = frame_metrics
  if jax.process_index() == 0:
    io_utils.write_json(io_utils.join(workdir, 'eval.json'), report)
  save_frame_metrics(config, io_utils.join(workdir, 'frame_metrics.png'), frame_metrics)
  return rows


def tokenizer_eval_stage(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh) -> dict:
  """``tokenizer_eval.json``: the trained tokenizer alone, before any transformer: FVD of its
  reconstructions of the real clips (each clip encoded and decoded) and, for frame prediction,
  their PSNR and SSIM frame by frame (plotted in ``tokenizer_frame_metrics.png``), beside
  repeating the last condition frame, and the FVD floor (``other_split_clips``). What a sampler
  can reach through this tokenizer, to tune it without training the transformer."""
  params = stages.tokenizer_stage(config, workdir, mesh)
  i3d, size = fvd.default_features(), config.eval.fvd_image_size
  real = streamed_features(features_path(workdir, 'real'), lambda: real_clips(config, mesh),
                           config.eval.saved_clips, i3d, size)['features']

  def reconstructions():
    for share, videos, _ in real_clips(config, mesh):
      ids = tokenizer.encode_batch(config, params, {'video': videos}, mesh)
      yield share, tokenizer.decode_tokens(config, params, ids, mesh), None

  # Each set with the real clips its frames are scored against (the floor's clips have none).
  paired = paired_real_clips(config, mesh)
  sets = {'reconstruction_of_real': (reconstructions, paired),
          'other_split_clips': (other_split_clips(config, mesh), None)}
  if tasks.task_of(config).num_given:
    sets['repeat_last_condition_frame'] = (repeated_last_condition_frame(config, mesh), paired)
  pretrained = tokenizer_file.pretrained_path(config)
  report = ({'pretrained_tokenizer': pretrained} if pretrained else
            {'tokenizer_steps': config.tokenizer_training.num_steps})
  report['num_clips'] = len(real)
  frame_metrics = {}
  for name, (batches, paired_clips) in sets.items():
    result = streamed_features(features_path(workdir, name), batches, 0, i3d, size,
                               paired_clips)
    mean, _, summary = set_scores(result, real, config)
    report[name] = {'fvd': mean, **(summary or {})}
    if summary:
      frame_metrics[name] = summary
  if jax.process_index() == 0:
    io_utils.write_json(io_utils.join(workdir, 'tokenizer_eval.json'), report)
  save_frame_metrics(config, io_utils.join(workdir, 'tokenizer_frame_metrics.png'),
                     frame_metrics)
  return report
