"""The stages of the main job, each resumable and skipped when its final output exists:

tokenizer -> token dataset -> transformer -> samples -> eval (plus the MNIST scoring classifier).
Outputs live under ``workdir``; only process 0 writes samples and metrics.
"""

import functools
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from nested_decode import config_lib
from nested_decode import io_utils
from nested_decode import tasks
from nested_decode.data import clips
from nested_decode.data import moving_mnist
from nested_decode.data import pipeline
from nested_decode.decoding.sampler import make_decoder
from nested_decode.evaluation import decode_benchmark
from nested_decode.evaluation import mnist_classifier
from nested_decode.evaluation import sample_writer
from nested_decode.models.transformer import NestedMaskedTransformer
from nested_decode.training import train_tokenizer
from nested_decode.training import train_transformer


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

DATASETS = ('mnist', 'imagenet2012', 'moving_mnist', 'ucf101', 'kinetics600')


def data_sources(config: ml_collections.ConfigDict, num_frames: int | None = None
                 ) -> tuple[Any, Any, Any, Any]:
  """``(train_source, eval_source, train_transform, eval_transform)`` of ``config.data``.

  Video transforms cut clips of ``num_frames`` (default ``config.data.num_frames``) frames.
  """
  data = config.data
  if data.name == 'mnist':
    train, evaluation = pipeline.mnist_sources(data.image_size)
    return train, evaluation, None, None
  if data.name == 'imagenet2012':
    from nested_decode.data import imagenet  # TFDS: only for real runs
    train = imagenet.imagenet_source('train', data.get('data_dir'), data.get('manual_dir'))
    evaluation = imagenet.imagenet_source('validation', data.get('data_dir'))
    return (train, evaluation, imagenet.TrainTransform(data.image_size),
            imagenet.EvalTransform(data.image_size))
  frames = num_frames or data.num_frames
  stride = data.get('frame_stride', 1)
  if data.name == 'moving_mnist':
    train, evaluation = moving_mnist.moving_mnist_sources(data.num_train_clips,
                                                          data.num_eval_clips)
  elif data.name == 'ucf101':
    from nested_decode.data import ucf101  # TFDS: only for real runs
    train = ucf101.ucf101_source('train', data.get('data_dir'))
    evaluation = ucf101.ucf101_source('test', data.get('data_dir'))
  elif data.name == 'kinetics600':
    from nested_decode.data import video_files  # PyAV: only for real runs
    for key in ('video_dir', 'train_csv', 'eval_csv'):
      if not data.get(key):
        raise ValueError(f'config.data.{key} is empty: Kinetics-600 reads the official CSVs '
                         f'and a folder of the video files')
    train, evaluation = kinetics_sources(data.video_dir, data.train_csv, data.eval_csv,
                                         data.num_frames, stride, data.image_size)
    return (train, evaluation, video_files.TrainClip(frames, stride, data.image_size),
            video_files.EvalClip(data.num_frames, stride, data.image_size))
  else:
    raise ValueError(f"config.data.name={data.name!r} is invalid: allowed values are "
                     f"{DATASETS}")
  return (train, evaluation, clips.RandomClip(frames, stride, data.image_size),
          clips.FirstClip(data.num_frames, stride, data.image_size))


@functools.cache  # each stage asks for the sources; scan the video files once per process
def kinetics_sources(video_dir: str, train_csv: str, eval_csv: str, num_frames: int,
                     stride: int, image_size: int) -> tuple[Any, Any]:
  from nested_decode.data import video_files  # PyAV: only for real runs
  common = dict(num_frames=num_frames, stride=stride, image_size=image_size)
  train = video_files.VideoFileSource(video_dir, train_csv, **common)
  evaluation = video_files.VideoFileSource(video_dir, eval_csv, class_names=train.class_names,
                                           **common)
  return train, evaluation


def resumable_batches(source: Any, transform: Any, batch_size: int, seed: int):
  """``(make_iterator, iterator_state)`` over this process's shard, for the trainers."""
  loader = pipeline.make_loader(source, batch_size=batch_size, seed=seed, train=True,
                                transform=transform, shard_index=jax.process_index(),
                                shard_count=jax.process_count())

  def make_iterator(state):
    return iter(loader) if state is None else pipeline.restore_iterator(loader, state)

  return make_iterator, pipeline.iterator_state


def all_images(source: Any) -> tuple[np.ndarray, np.ndarray]:
  """Every example of a (small, in-memory) source as uint8 images and labels."""
  examples = [source[i] for i in range(len(source))]
  return (np.stack([e['image'] for e in examples]),
          np.asarray([e['label'] for e in examples], np.int32))


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------

def tokenizer_stage(config: ml_collections.ConfigDict, workdir: str) -> Any:
  if not train_tokenizer.is_trained(config, workdir):
    train, _, transform, _ = data_sources(config,
                                          config.tokenizer_training.get('num_frames'))
    batches = resumable_batches(train, transform, config.tokenizer_training.batch_size,
                                config.seed)
    train_tokenizer.train(config, workdir, *batches)
  return train_tokenizer.load_params(config, workdir)


def token_dataset(config: ml_collections.ConfigDict, workdir: str, split: str
                  ) -> tuple[np.ndarray, np.ndarray]:
  """``(tokens [n, N], labels [n])`` of a split, encoded once (center crops, in order) and
  stored in the workdir."""
  path = io_utils.join(workdir, 'tokens', f'{split}.npz')
  if not io_utils.exists(path):
    params = tokenizer_stage(config, workdir)
    train, evaluation, _, eval_transform = data_sources(config)
    loader = pipeline.make_loader(train if split == 'train' else evaluation,
                                  batch_size=config.eval.batch_size, seed=config.seed,
                                  train=False, transform=eval_transform)
    tokens, labels = [], []
    for batch in loader:
      tokens.append(train_tokenizer.encode_batch(config, params, batch))
      labels.append(batch['label'])
    tokens, labels = np.concatenate(tokens).astype(np.int32), np.concatenate(labels)
    if jax.process_index() == 0:
      io_utils.write_npz(path, tokens=tokens, labels=labels)
    return tokens, labels
  stored = io_utils.load_npz(path)
  return stored['tokens'], stored['labels']


def transformer_stage(config: ml_collections.ConfigDict, workdir: str) -> Any:
  if not train_transformer.is_trained(config, workdir):
    tokens, labels = token_dataset(config, workdir, 'train')
    source = pipeline.ArraySource(f'tokens/train/{config.data.name}', tokens=tokens,
                                  label=labels)
    batches = resumable_batches(source, None, config.training.batch_size, config.seed)
    train_transformer.train(config, workdir, *batches)
  return train_transformer.load_params(config, workdir)


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


# ----------------------------------------------------------------------------------------------
# Sampling and evaluation
# ----------------------------------------------------------------------------------------------

def schedule_decoder(config: ml_collections.ConfigDict, schedule: ml_collections.ConfigDict):
  """The jit-compiled decode of one schedule (compiled on first use, then reused)."""
  model = NestedMaskedTransformer(config_lib.transformer_config(config))
  return make_decoder(model, config_lib.decode_plan(config, schedule),
                      config_lib.sampling_options(config))


def token_batches(config: ml_collections.ConfigDict, params: Any, decode: Any,
                  labels: np.ndarray, seed: int, given_tokens: np.ndarray | None = None,
                  batch_seconds: list[float] | None = None) -> Iterator[np.ndarray]:
  """Token samples for ``labels``, decoded and yielded in batches of ``eval.batch_size``.

  ``given_tokens [n, N]`` holds the task's known tokens (frame prediction: the condition's
  latent frames of clip ``i`` for sample ``i``); without it every token is generated. Each
  batch's wall time is appended to ``batch_seconds`` when given.
  """
  model_config = config_lib.transformer_config(config)
  task = tasks.task_of(config)
  if task.num_given and (given_tokens is None or len(given_tokens) < len(labels)):
    raise ValueError(f'{task.name} needs given tokens for each of the {len(labels)} samples')
  batch = config.eval.batch_size
  rng = jax.random.PRNGKey(seed)
  for start in range(0, len(labels), batch):
    chunk = jnp.asarray(labels[start:start + batch], jnp.int32)
    if task.num_given:
      init = task.initial_tokens(given_tokens[start:start + len(chunk)], model_config.mask_id)
    else:
      init = np.full((len(chunk), model_config.seq_len), model_config.mask_id, np.int32)
    began = time.perf_counter()
    tokens = np.asarray(decode(params, jnp.asarray(init), chunk,
                               jax.random.fold_in(rng, start)).tokens)
    if batch_seconds is not None:
      batch_seconds.append(time.perf_counter() - began)
    yield tokens


def generate_tokens(config: ml_collections.ConfigDict, params: Any, decode: Any,
                    labels: np.ndarray, seed: int,
                    batch_seconds: list[float] | None = None) -> np.ndarray:
  """Class-conditional token samples ``[n, N]`` for ``labels`` (see ``token_batches``)."""
  return np.concatenate(list(token_batches(config, params, decode, labels, seed,
                                           batch_seconds=batch_seconds)))


def sample_labels(config: ml_collections.ConfigDict) -> np.ndarray:
  return np.arange(config.eval.num_samples, dtype=np.int32) % max(config.tokens.num_classes, 1)


def samples_path(workdir: str, name: str) -> str:
  return io_utils.join(workdir, 'samples', f'{name}.npz')


def sample_stage(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict]:
  """Per schedule: ``samples/<name>.npz`` (images, labels) and a PNG grid, one row per class
  (videos: see ``video_stages``)."""
  if train_tokenizer.is_video(config):
    from nested_decode import video_stages
    video_stages.sample_stage(config, workdir)
    return {row['schedule']: row for row in decode_benchmark.flops_rows(config)}
  transformer = transformer_stage(config, workdir)
  tokenizer = tokenizer_stage(config, workdir)
  rows = {row['schedule']: row for row in decode_benchmark.flops_rows(config)}
  labels = sample_labels(config)
  for name, schedule in config_lib.schedules_with_baseline(config).items():
    path = samples_path(workdir, name)
    if io_utils.exists(path):
      continue
    logging.info('Sampling %d images with schedule %s', len(labels), name)
    tokens = generate_tokens(config, transformer, schedule_decoder(config, schedule), labels,
                             config.seed)
    images = train_tokenizer.decode_tokens(config, tokenizer, tokens)
    if jax.process_index() == 0:
      sample_writer.save_samples_npz(path, images, labels)
      widths = ' '.join(f'{p}x{s}' for p, s in schedule.widths)
      title = (f"{name} ({widths}, cache {schedule.cache}): "
               f"{rows[name]['gflops_per_sample']:.3g} GFLOPs/sample")
      keep = np.concatenate([np.flatnonzero(labels == c)[:config.eval.grid_per_class]
                             for c in np.unique(labels)])
      sample_writer.save_grid_png(path.replace('.npz', '.png'), images[keep], labels[keep],
                                  title=title, per_row=config.eval.grid_per_class)
  return rows


def eval_stage(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """``eval.json``: per schedule, FLOPs and classifier scores of its samples (MNIST) or FVD
  (videos)."""
  if train_tokenizer.is_video(config):
    from nested_decode import video_stages
    return video_stages.eval_stage(config, workdir)
  if config.data.name != 'mnist':
    raise NotImplementedError(
        f'--mode=eval scores samples with the in-project MNIST classifier; config.data.name='
        f'{config.data.name!r} needs FID, which is not implemented yet')
  flops = sample_stage(config, workdir)
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
    row.update(scores, num_samples=len(sample_labels(config)))
    rows.append(row)
    logging.info('eval %s: %s', name, row)
  tokenizer = tokenizer_stage(config, workdir)
  eval_tokens, _ = token_dataset(config, workdir, 'eval')
  reconstructions = train_tokenizer.decode_tokens(config, tokenizer, eval_tokens)
  reference = scorer.score(reconstructions, held_out_labels)
  reference['reconstruction_mse'] = float(np.mean(
      (reconstructions.astype(np.float32) / 127.5 - held_out.astype(np.float32) / 127.5) ** 2))
  report = dict(rows=rows, tokenizer_reconstructions_of_held_out=reference,
                held_out_classifier_accuracy=mnist_classifier.class_accuracy(
                    scorer.classifier.predict(held_out),
                    held_out_labels))
  if jax.process_index() == 0:
    io_utils.write_json(io_utils.join(workdir, 'eval.json'), report)
  return rows
