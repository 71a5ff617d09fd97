"""The image job's last stages: class-conditional samples per schedule, and their evaluation.

MNIST: class accuracy and Fréchet distance on a classifier trained on the training digits, with
every sample kept. Other datasets (ImageNet): FID and Inception Score, streamed
(``fid_eval.py``)."""

from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from nested_decode import api, config_lib, io_utils
from nested_decode.data import pixels
from nested_decode.data.sources import all_images, data_sources, dataset
from nested_decode.inference import decode_cost
from nested_decode.networks import mnist_classifier
from nested_decode.pipeline import fid_eval, stages
from nested_decode.writers import sample_writer


def classifier_path(workdir: str) -> str:
  return io_utils.join(workdir, 'classifier', 'params.msgpack')


def classifier_stage(config: ml_collections.ConfigDict, workdir: str) -> Any:
  """The MNIST digit classifier that scores samples, trained on the training split."""
  path = classifier_path(workdir)
  if not io_utils.exists(path):
    train, _, _, _ = data_sources(config)
    images, labels = all_images(train)
    params = mnist_classifier.train_classifier(
        images, labels, steps=config.classifier.steps, batch_size=config.classifier.batch_size,
        seed=config.seed, log=logging.info)
    if jax.process_index() == 0:
      mnist_classifier.save_classifier(path, params)
    return params
  return mnist_classifier.load_classifier(path)


def samples_path(workdir: str, name: str) -> str:
  return io_utils.join(workdir, 'samples', f'{name}.npz')


def sample_stage(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh,
                 generator: api.Generator | None = None) -> dict[str, dict]:
  """Per schedule: ``samples/<name>.npz`` (images, labels) and a PNG grid, one row per class.
  The trained models are loaded (or trained) only when a schedule is left to sample."""
  if dataset(config).scoring == 'fid':
    return fid_eval.sample_stage(config, workdir, mesh, generator)
  rows = {row['schedule']: row for row in decode_cost.flops_rows(config)}
  labels = stages.sample_labels(config)
  for name in config_lib.schedules_with_baseline(config):
    path = samples_path(workdir, name)
    if io_utils.exists(path):
      continue
    generator = generator or stages.generator(config, workdir, mesh)
    logging.info('Sampling %d images with schedule %s', len(labels), name)
    samples = generator.sample(labels, name, seed=config.seed,
                               batch_size=config.eval.batch_size)
    if jax.process_index() == 0:
      sample_writer.save_samples_npz(path, samples.images, labels)
      title = (f'{name} ({samples.schedule.replace(",", " ")}, cache {samples.cache}): '
               f'{samples.gflops_per_sample:.3g} GFLOPs/sample')
      keep = np.concatenate([np.flatnonzero(labels == c)[:config.eval.grid_per_class]
                             for c in np.unique(labels)])
      sample_writer.save_grid_png(path.replace('.npz', '.png'), samples.images[keep],
                                  labels[keep], title=title,
                                  per_row=config.eval.grid_per_class)
  return rows


def reconstruction_scores(config: ml_collections.ConfigDict, workdir: str,
                          generator: api.Generator, scorer: mnist_classifier.SampleScorer,
                          held_out: np.ndarray, held_out_labels: np.ndarray) -> dict:
  """The tokenizer's reconstructions of the held-out digits (``scorer``'s reference), scored
  as samples are: the ceiling of every decode's quality."""
  eval_tokens, _ = stages.token_dataset(config, workdir, 'eval', generator.mesh)
  reconstructions = generator.decode(eval_tokens)
  scores = scorer.score(reconstructions, held_out_labels)
  scores['reconstruction_mse'] = float(np.mean(
      (pixels.to_float(reconstructions) - pixels.to_float(held_out)) ** 2))
  return scores


def eval_stage(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh) -> list[dict]:
  """``eval.json``: per schedule, FLOPs and classifier scores of its samples."""
  if dataset(config).scoring == 'fid':
    return fid_eval.eval_stage(config, workdir, mesh)
  generator = stages.generator(config, workdir, mesh)
  flops = sample_stage(config, workdir, mesh, generator)
  classifier = classifier_stage(config, workdir)
  _, evaluation, _, _ = data_sources(config)
  held_out, held_out_labels = all_images(evaluation)
  scorer = mnist_classifier.SampleScorer(classifier, held_out)
  rows = []
  for name in config_lib.schedules_with_baseline(config):
    samples = io_utils.load_npz(samples_path(workdir, name))
    scores = scorer.score(samples['images'], samples['labels'])
    row = {key: flops[name][key] for key in ('schedule', 'cache', 'steps', 'gflops_per_sample',
                                             'flop_ratio')}
    row.update(scores, num_samples=len(stages.sample_labels(config)))
    rows.append(row)
    logging.info('eval %s: %s', name, row)
  reference = reconstruction_scores(config, workdir, generator, scorer, held_out,
                                    held_out_labels)
  report = dict(rows=rows, tokenizer_reconstructions_of_held_out=reference,
                held_out_classifier_accuracy=mnist_classifier.class_accuracy(
                    scorer.classifier.predict(held_out),
                    held_out_labels))
  if jax.process_index() == 0:
    io_utils.write_json(io_utils.join(workdir, 'eval.json'), report)
  return rows
