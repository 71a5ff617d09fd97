"""FID and Inception Score of class-conditional image samples (ImageNet 256: ADM's protocol).

Per schedule, ``eval.num_samples`` samples (50,000 on ImageNet: 50 per class) are decoded in
global batches of ``eval.batch_size``; each process decodes its rows to images and puts them
through Inception, and only the streamed statistics are kept (``fid.ImageStatistics``: memory
does not grow with the number of samples). ``samples/<name>_inception.npz`` holds a finished
schedule's statistics, so a resumed job skips it; ``samples/<name>.png`` shows the first
``eval.grid_per_class`` samples of the first classes.

The reference (``eval.fid_reference``) is a TFDS split of the config's dataset, center-cropped
and resized as the tokenizer sees it (ADM's reference batch is the training set at 256), or an
ADM-format ``.npz`` reference batch (``mu``/``sigma`` or images). The tokenizer's reconstructions
of the held-out images are scored against it too: the ceiling any sampler reaches through this
tokenizer.
"""

import time

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from nested_decode import api, config_lib, io_utils, parallel
from nested_decode.data import pipeline
from nested_decode.data.sources import data_sources
from nested_decode.inference import decode_cost, tokenizer
from nested_decode.metrics import fid
from nested_decode.pipeline import stages
from nested_decode.writers import sample_writer

GRID_CLASSES = 10


def network(config: ml_collections.ConfigDict) -> fid.InceptionNetwork:
  """Inception with ``eval.inception_weights`` (empty: the fetched FID weights, no IS head)."""
  return fid.network(config.eval.get('inception_weights') or None)


def statistics_path(workdir: str, name: str) -> str:
  return io_utils.join(workdir, 'samples', f'{name}_inception.npz')


def _streamed_statistics(path: str, total: int, batches, net: fid.InceptionNetwork, what: str,
                         keep: int = 0) -> tuple[fid.ImageStatistics, np.ndarray | None]:
  """Statistics of the images ``batches()`` yields as ``(share, this process's images)``, read
  from ``path`` when a finished run left them there, else computed and saved (process 0)."""
  if io_utils.exists(path):
    return fid.ImageStatistics.load(path), None
  stats = fid.ImageStatistics(total)
  kept = []
  began, last_log = time.perf_counter(), 0.0
  for share, images in batches():
    outputs = net(images)
    stats.add({k: parallel.gather_share(v, share) for k, v in outputs.items()})
    if sum(len(k) for k in kept) < keep:
      kept.append(parallel.gather_share(images, share))
    elapsed = time.perf_counter() - began
    if elapsed - last_log > 30 or stats.count == total:
      last_log = elapsed
      logging.info('%s: %d of %d images through Inception, %.0f s, ETA %.0f s', what,
                   stats.count, total, elapsed, elapsed * (total - stats.count) / stats.count)
  if stats.count != total:
    raise RuntimeError(f'{what}: {stats.count} images instead of {total}')
  if jax.process_index() == 0:
    stats.save(path)
  return stats, (np.concatenate(kept)[:keep] if keep else None)


def _grid_rows(labels: np.ndarray, per_class: int) -> tuple[int, np.ndarray]:
  """How many leading samples cover the grid, and which of them it shows: the first
  ``per_class`` samples of each of the first ``GRID_CLASSES`` classes."""
  classes = np.unique(labels)[:GRID_CLASSES]
  rows = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in classes])
  return int(rows.max()) + 1, rows


def _schedule_images(generator: api.Generator, name: str, labels: np.ndarray):
  """``(share, this process's uint8 images)`` of schedule ``name``'s samples, batch by batch."""
  config = generator.config
  for share, output in generator.token_batches(generator.schedule(name), labels, config.seed):
    yield share, tokenizer.decode_tokens(config, generator.tokenizer_params, output['tokens'],
                                         generator.mesh)


def sample_stage(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh,
                 generator: api.Generator | None = None) -> dict[str, fid.ImageStatistics]:
  """Per schedule (baseline first): Inception statistics of its samples and a PNG grid."""
  net = network(config)
  labels = stages.sample_labels(config)
  flops = {row['schedule']: row for row in decode_cost.flops_rows(config)}
  keep, grid_rows = _grid_rows(labels, config.eval.grid_per_class)
  result = {}
  for name in config_lib.schedules_with_baseline(config):
    path = statistics_path(workdir, name)
    if generator is None and not io_utils.exists(path):
      generator = stages.generator(config, workdir, mesh)
    stats, kept = _streamed_statistics(path, len(labels),
                                       lambda g=generator, n=name: _schedule_images(g, n, labels),
                                       net, f'schedule {name}', keep)
    if kept is not None and jax.process_index() == 0:
      title = f'{name}: {flops[name]["gflops_per_sample"]:.3g} GFLOPs/sample'
      sample_writer.save_grid_png(path.replace('_inception.npz', '.png'), kept[grid_rows],
                                  labels[grid_rows], title=title,
                                  per_row=config.eval.grid_per_class)
    result[name] = stats
  return result


def reference_statistics(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh,
                         net: fid.InceptionNetwork) -> tuple[tuple[np.ndarray, np.ndarray], dict]:
  """``((mu, sigma), description)`` of ``eval.fid_reference``."""
  spec = config.eval.fid_reference
  minimum = config.eval.min_reference_images
  if not spec:
    raise config_lib.ConfigError('config.eval.fid_reference is empty: name a TFDS split '
                                 "(e.g. 'train') or an ADM reference batch .npz")
  if spec.endswith('.npz'):
    statistics, count = fid.read_reference_batch(spec, minimum, net)
    return statistics, dict(source=spec, num_images=count)
  from nested_decode.data import imagenet  # TFDS: only for real runs
  source = imagenet.imagenet_source(spec, config.data.get('data_dir'))
  fid.check_reference_count(len(source), minimum, f'{config.data.name} split {spec!r}')
  _, _, _, transform = data_sources(config)

  def batches():
    for share in parallel.row_shares(len(source), config.eval.batch_size, mesh):
      yield share, pipeline.examples_at(source, share.rows, transform)['image']

  safe_name = spec.replace('[', '_').replace(']', '').replace(':', '-').replace('%', 'pc')
  stats, _ = _streamed_statistics(statistics_path(workdir, f'reference_{safe_name}'),
                                  len(source), batches, net, f'reference {spec}')
  return stats.fid_statistics(), dict(source=f'{config.data.name} {spec}', num_images=len(source))


def _scores(stats: fid.ImageStatistics, reference) -> dict:
  scores = dict(fid=fid.fid(stats, reference), inception_score=None, inception_score_std=None)
  if stats.has_logits:
    scores['inception_score'], scores['inception_score_std'] = stats.inception_score()
  return scores


def eval_stage(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh) -> list[dict]:
  """``eval.json``: per schedule GFLOPs, FID and Inception Score, and the tokenizer's ceiling."""
  net = network(config)
  generator = stages.generator(config, workdir, mesh)
  samples = sample_stage(config, workdir, mesh, generator)
  reference, reference_info = reference_statistics(config, workdir, mesh, net)
  flops = {row['schedule']: row for row in decode_cost.flops_rows(config)}
  rows = []
  for name, stats in samples.items():
    row = {key: flops[name][key] for key in ('schedule', 'cache', 'steps', 'gflops_per_sample',
                                             'flop_ratio')}
    row.update(_scores(stats, reference), num_samples=stats.count)
    rows.append(row)
    logging.info('eval %s: %s', name, row)
  eval_tokens, _ = stages.token_dataset(config, workdir, 'eval', mesh)

  def reconstructions():
    for share in parallel.row_shares(len(eval_tokens), config.eval.batch_size, mesh):
      yield share, tokenizer.decode_tokens(config, generator.tokenizer_params,
                                           share.take(eval_tokens), mesh)

  ceiling, _ = _streamed_statistics(statistics_path(workdir, 'tokenizer_reconstruction'),
                                    len(eval_tokens), reconstructions, net,
                                    'tokenizer reconstructions')
  report = dict(rows=rows, reference=reference_info,
                tokenizer_reconstructions_of_held_out=dict(_scores(ceiling, reference),
                                                           num_images=ceiling.count),
                inception_score_needs=None if net.has_head else (
                    "pytorch-fid's pt_inception-2015-12-05 weights in "
                    'config.eval.inception_weights'))
  if jax.process_index() == 0:
    io_utils.write_json(io_utils.join(workdir, 'eval.json'), report)
  return rows
