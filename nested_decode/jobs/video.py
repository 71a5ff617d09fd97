"""Sampling and FVD evaluation of the video tasks (frame prediction, class-conditional video).

Each schedule's clips are generated in batches and go straight through I3D, so memory does not
grow with ``eval.num_samples`` (50,000 clips at paper scale): ``samples/<name>_i3d.npz`` keeps
the features (a finished schedule is skipped when the job is resumed) and ``samples/<name>.npz``
the first ``eval.saved_clips`` clips. Frame prediction conditions sample ``i`` on held-out clip
``i``: its given tokens are the tokenizer's tokens of that clip's condition frames.

``eval.json`` rows: ``fvd`` of each schedule's clips against the real held-out clips, with
``gflops_per_sample`` and ``flop_ratio``. For scale it also scores the tokenizer's
reconstructions of the real clips (the ceiling any sampler can reach through this tokenizer)
and, for frame prediction, repeating the last condition frame (a model that learned nothing).
"""

from typing import Callable, Iterator

import jax
import ml_collections
import numpy as np
from absl import logging

from nested_decode import api
from nested_decode import config_lib
from nested_decode import io_utils
from nested_decode import parallel
from nested_decode import tasks
from nested_decode.data import pipeline
from nested_decode.data.sources import data_sources
from nested_decode.evaluation import decode_benchmark
from nested_decode.evaluation import frechet
from nested_decode.evaluation import fvd
from nested_decode.evaluation import video_writer
from nested_decode.jobs import stages
from nested_decode.training import train_tokenizer


ClipBatches = Callable[[], Iterator[tuple[parallel.RowShare, np.ndarray]]]


def real_clips(config: ml_collections.ConfigDict) -> Iterator[tuple[parallel.RowShare,
                                                                     np.ndarray]]:
  """The first ``eval.num_samples`` held-out clips in order, as uint8 videos: per global
  batch, this process's share of the rows and its clips of them."""
  _, evaluation, _, eval_transform = data_sources(config)
  check_num_samples(config, len(evaluation))
  for share in parallel.row_shares(config.eval.num_samples, config.eval.batch_size,
                                   api.eval_mesh(config)):
    yield share, pipeline.to_uint8(pipeline.examples_at(evaluation, share.rows, eval_transform)['video'])


def check_num_samples(config: ml_collections.ConfigDict, available: int) -> None:
  if config.eval.num_samples > available:
    raise ValueError(f'config.eval.num_samples={config.eval.num_samples} but the held-out split '
                     f'has {available} clips')


def condition(config: ml_collections.ConfigDict, eval_tokens: np.ndarray,
              eval_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
  """``(labels [n], given_tokens [n, N] or None)`` of the ``eval.num_samples`` samples."""
  if tasks.task_of(config).num_given == 0:
    return stages.sample_labels(config), None
  check_num_samples(config, len(eval_tokens))
  n = config.eval.num_samples
  return eval_labels[:n], eval_tokens[:n]


def features_path(workdir: str, name: str) -> str:
  return io_utils.join(workdir, 'samples', f'{name}_i3d.npz')


def streamed_features(path: str, batches: ClipBatches, saved_clips: int,
                      i3d: fvd.I3DFeatures) -> np.ndarray:
  """I3D features of the clips ``batches`` yields (each process computes those of its rows;
  all are gathered), stored at ``path`` (and read from it when present); the first
  ``saved_clips`` clips also go to ``path`` without the ``_i3d`` suffix."""
  if io_utils.exists(path):
    return io_utils.load_npz(path)['features']
  features, kept = [], []
  for share, videos in batches():
    features.append(parallel.gather_share(i3d(videos), share))
    if sum(len(k) for k in kept) < saved_clips:
      kept.append(parallel.gather_share(videos, share))
  features = np.concatenate(features)
  if jax.process_index() == 0:
    if saved_clips:
      io_utils.write_npz(path.replace('_i3d.npz', '.npz'),
                         videos=np.concatenate(kept)[:saved_clips])
    io_utils.write_npz(path, features=features)
  return features


def schedule_clips(generator: api.Generator, name: str, labels: np.ndarray,
                   given: np.ndarray | None) -> ClipBatches:
  """A fresh iterator over the uint8 clips schedule ``name`` decodes, batch by batch."""
  config = generator.config

  def batches():
    for share, output in generator.token_batches(generator.schedule(name), labels, config.seed,
                                                 given):
      yield share, train_tokenizer.decode_tokens(config, generator.tokenizer_params,
                                                 output['tokens'])
    logging.info('Sampled %d clips with schedule %s', len(labels), name)
  return batches


def sample_stage(config: ml_collections.ConfigDict, workdir: str) -> dict[str, np.ndarray]:
  """Per schedule and the baseline: I3D features of its clips, and the comparison GIF."""
  return sample_with(config, workdir, stages.generator(config, workdir),
                     stages.token_dataset(config, workdir, 'eval'), fvd.default_features())


def sample_with(config, workdir, generator, eval_token_dataset, i3d) -> dict[str, np.ndarray]:
  labels, given = condition(config, *eval_token_dataset)
  saved = config.eval.saved_clips
  features = {}
  for name in config_lib.schedules_with_baseline(config):
    features[name] = streamed_features(
        features_path(workdir, name), schedule_clips(generator, name, labels, given), saved,
        i3d)
  features['real'] = streamed_features(features_path(workdir, 'real'),
                                       lambda: real_clips(config), saved, i3d)
  if jax.process_index() == 0:
    write_comparison_gif(config, workdir)
  return features


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


def reference_batches(config, tokenizer, eval_tokens) -> dict[str, ClipBatches]:
  """Clip sets that put the samples' FVD in context (see the module docstring)."""
  check_num_samples(config, len(eval_tokens))

  def reconstructions():
    for share in parallel.row_shares(config.eval.num_samples, config.eval.batch_size,
                                     api.eval_mesh(config)):
      yield share, train_tokenizer.decode_tokens(config, tokenizer, share.take(eval_tokens))

  references = {'tokenizer_reconstruction': reconstructions}
  if tasks.task_of(config).num_given:
    last = config.task.condition_frames - 1

    def repeat_last_condition_frame():
      for share, videos in real_clips(config):
        yield share, np.concatenate([videos[:, :last + 1]] + [videos[:, last:last + 1]]
                                    * (videos.shape[1] - last - 1), axis=1)
    references['repeat_last_condition_frame'] = repeat_last_condition_frame
  return references


def eval_stage(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """``eval.json``: per schedule GFLOPs and FVD against the real held-out clips."""
  i3d = fvd.default_features()
  generator = stages.generator(config, workdir)
  eval_tokens, eval_labels = stages.token_dataset(config, workdir, 'eval')
  features = sample_with(config, workdir, generator, (eval_tokens, eval_labels), i3d)
  real = features.pop('real')
  flops = {row['schedule']: row for row in decode_benchmark.flops_rows(config)}
  rows = []
  for name, sample_features in features.items():
    row = {key: flops[name][key] for key in ('schedule', 'cache', 'steps', 'gflops_per_sample',
                                             'flop_ratio')}
    row.update(fvd=frechet.frechet_distance_from_features(sample_features, real),
               num_clips=len(sample_features))
    rows.append(row)
    logging.info('eval %s: %s', name, row)
  references = {}
  for name, batches in reference_batches(config, generator.tokenizer_params,
                                         eval_tokens).items():
    reference = streamed_features(features_path(workdir, name), batches, 0, i3d)
    references[name] = frechet.frechet_distance_from_features(reference, real)
  report = dict(rows=rows, reference_fvd=references, num_real_clips=len(real),
                task=tasks.task_of(config).name)
  if jax.process_index() == 0:
    io_utils.write_json(io_utils.join(workdir, 'eval.json'), report)
  return rows
