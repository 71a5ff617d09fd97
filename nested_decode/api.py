"""Load a trained model and decode with any schedule: the one way samples are made.

    from nested_decode import api
    model = api.load('runs/mnist')                       # a workdir, or an exported .msgpack
    out = model.sample([3, 1, 4], schedule='8x3,4x3,2x3,1x3')
    out.images, out.gflops_per_sample, out.seconds

A schedule is a name from ``config.eval.schedules`` (or ``'baseline'``, full width for
``sampling.steps`` steps), a string ``'8x3,4x3,2x3,1x3'`` (nesting factor x steps, narrowest
first for MaGNeTS), or ``((8, 3), (4, 3), ...)``; ``cache`` is ``'none'``,
``'refresh_on_switch'`` or ``'refresh_every_k'``. ``predict_frames`` continues given condition
frames (video frame prediction workdirs).

Decoding runs in global batches of ``batch_size`` rows whose rows are split over the processes
and devices (``parallel.row_shares``); a batch's random numbers are drawn for the whole global
batch, so samples do not depend on how many processes or devices share the work. Decode steps
run compiled programs shared by every schedule of the model (one per width, pass kind, query
bucket and batch shape; ``sampler.Decoder``); parameters are cast to the compute dtype once, at
load. ``seconds`` times the compiled transformer decode alone (what ``gflops_per_sample``
counts), not compilation or the tokenizer.

A transformer trained with ``training.ema_decay > 0`` decodes with the moving average of its
weights (``Generator.transformer_weights`` says which weights were loaded).

The job's stages (``nested_decode/pipeline``), the studies and the demo notebook
all sample through ``Generator``.
"""

import dataclasses
import json
import re
import time
from typing import Any, Iterator, Sequence

import flax
import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from nested_decode import checkpoints, config_lib, config_migrations, io_utils, parallel, tasks
from nested_decode.decoding import sampler
from nested_decode.decoding.plan import DecodeStep
from nested_decode.decoding.schedule import BASELINE, Schedule, ScheduleError
from nested_decode.inference import restore, tokenizer
from nested_decode.models import flops as flops_lib
from nested_decode.models.transformer import cast_for_inference

ScheduleSpec = str | Sequence[Sequence[int]] | ml_collections.ConfigDict | Schedule
SPEC_PATTERN = re.compile(r'\s*\d+\s*x\s*\d+\s*(,\s*\d+\s*x\s*\d+\s*)*')


class NotTrainedError(FileNotFoundError):
  """The workdir has no finished tokenizer or transformer to sample with."""


@dataclasses.dataclass
class Samples:
  """What one call decoded. ``images`` are uint8 ``[n, H, W, C]`` (videos ``[n, T, H, W, C]``),
  ``tokens [n, N]``; with ``record_steps``, ``step_tokens [n, T, N]`` holds the canvas after
  each step (``mask_id`` where still masked) and ``step_widths`` the nesting factor of each."""
  images: np.ndarray
  tokens: np.ndarray
  labels: np.ndarray
  schedule: str
  cache: str
  gflops_per_sample: float
  flop_ratio: float  # the baseline's GFLOPs per sample over these
  seconds: float  # wall time of the compiled transformer decode of all batches
  compile_seconds: float
  step_widths: list[int]
  step_tokens: np.ndarray | None = None

  @property
  def ms_per_sample(self) -> float:
    return 1000 * self.seconds / len(self.tokens)


class Generator:
  """A trained tokenizer and nested transformer with their config, ready to decode."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer_params: Any,
               transformer_params: Any, mesh: Mesh | None = None,
               transformer_weights: str = restore.TRAINED):
    """``mesh``: the job's mesh (default: ``parallel.make_mesh(config)``, all devices);
    ``transformer_weights``: which weights ``transformer_params`` are, ``restore.EMA`` (the
    moving average) or ``restore.TRAINED``."""
    self.config = config
    self.tokenizer_params = tokenizer_params
    self.transformer_params = transformer_params
    self.transformer_weights = transformer_weights
    self.task = tasks.task_of(config)
    self.mesh = parallel.make_mesh(config) if mesh is None else mesh
    parallel.check_batch_size(config.eval.batch_size, self.mesh, 'eval.batch_size')
    self.model_config = config_lib.decoding_transformer_config(config)
    self.decode_task = config_lib.decode_task(config)
    self._decoder = sampler.decoder_for(self.model_config, config_lib.sampling_options(config),
                                        parallel.logical_rules(config))
    self._inference_params = cast_for_inference(transformer_params, self.model_config.dtype)
    self._plans = {}

  @property
  def mask_id(self) -> int:
    return self._decoder.model.config.mask_id

  # -- schedules and their cost ----------------------------------------------------------------

  def schedule(self, spec: ScheduleSpec = BASELINE, cache: str | None = None) -> Schedule:
    """The schedule ``spec`` names or writes out (see the module docstring), with ``cache``
    when given; a ``ScheduleError`` says what the model cannot decode."""
    named = config_lib.schedules_with_baseline(self.config)
    try:
      schedule = Schedule.parse(named.get(spec, spec) if isinstance(spec, str) else spec, cache)
      schedule.check(self.decode_task)
    except ScheduleError as error:
      if isinstance(spec, str) and spec not in named and not SPEC_PATTERN.fullmatch(spec):
        raise ScheduleError('schedule', spec, f'neither a name ({", ".join(named)}) nor factor '
                            "x steps segments like '8x3,4x3,2x3,1x3'") from None
      raise ScheduleError(f'schedule.{error.field}', error.value, error.problem) from None
    return schedule

  def plan(self, schedule: Schedule | ml_collections.ConfigDict) -> tuple[DecodeStep, ...]:
    """``schedule``'s decode steps (a ``Schedule`` or a config entry), planned once per
    schedule."""
    schedule = Schedule.parse(schedule)
    if schedule not in self._plans:
      self._plans[schedule] = schedule.plan(self.decode_task)
    return self._plans[schedule]

  def step_flops(self, schedule: Schedule) -> list[int]:
    """FLOPs per sample of each step of ``schedule`` (guidance included)."""
    return flops_lib.decode_flops(self.model_config, self.plan(schedule),
                                  self.config.sampling.guidance_scale > 0)

  def flops(self, schedule: Schedule) -> dict:
    """``gflops_per_sample``, ``flop_ratio`` against the baseline and ``per_step_gflops``."""
    per_step = self.step_flops(schedule)
    baseline = sum(self.step_flops(self.schedule(BASELINE)))
    return dict(gflops_per_sample=sum(per_step) / 1e9, flop_ratio=baseline / sum(per_step),
                per_step_gflops=[f / 1e9 for f in per_step])

  # -- decoding ----------------------------------------------------------------------------------

  def token_batches(self, schedule: Schedule, labels: np.ndarray, seed: int,
                    given_tokens: np.ndarray | None = None, batch_size: int | None = None,
                    record_steps: bool = False, timings: dict | None = None
                    ) -> Iterator[tuple[parallel.RowShare, Any]]:
    """Per global batch of ``batch_size`` (default ``eval.batch_size``) samples of
    ``labels``: this process's share of the rows and its ``tokens`` of them (and
    ``step_tokens``, the canvas after each step, when ``record_steps``) in a dict; a short
    last batch is padded, so there is a row for each of ``share.rows``.

    ``given_tokens [n, N]`` holds the task's known tokens (frame prediction: the condition's
    latent frames of sample ``i``); without it every token is generated. ``timings`` gets
    ``batch_seconds`` (one per batch, compiled decode only) and ``compile_seconds``.
    """
    labels = np.asarray(labels, np.int32)
    if self.task.num_given and (given_tokens is None or len(given_tokens) < len(labels)):
      raise ValueError(f'{self.task.name} needs given tokens for each of the {len(labels)} '
                       'samples')
    batch_size = batch_size or self.config.eval.batch_size
    parallel.check_batch_size(batch_size, self.mesh, 'batch_size')
    timings = {} if timings is None else timings
    timings.setdefault('batch_seconds', [])
    timings.setdefault('compile_seconds', 0.0)
    rng = jax.random.PRNGKey(seed)
    plan = self.plan(schedule)
    decoded = 0
    for share in parallel.row_shares(len(labels), batch_size, self.mesh):
      if self.task.num_given:
        init = self.task.initial_tokens(share.take(given_tokens), self.mask_id)
      else:
        init = np.full((len(share.rows), self.task.seq_len), self.mask_id, np.int32)
      def run(init, labels, rows):
        began, compiled_before = time.perf_counter(), self._decoder.compile_seconds
        output = jax.block_until_ready(self._decoder(self._inference_params, init, labels, rng,
                                                     plan, rows, record_steps))
        compiling = self._decoder.compile_seconds - compiled_before
        timings['compile_seconds'] += compiling
        timings['batch_seconds'].append(time.perf_counter() - began - compiling)
        return {'tokens': output.tokens, 'step_tokens': output.step_tokens}

      # Sample i's random numbers come from (seed, i): the same in any batch, on any mesh.
      yield share, parallel.apply_to_local_rows(run, self.mesh, init, share.take(labels),
                                                share.rows.astype(np.int32))
      decoded += share.num_valid
    logging.info('Process %d decoded %d of %d samples', jax.process_index(), decoded,
                 len(labels))

  def sample_tokens(self, labels: Sequence[int], schedule: Schedule,
                    seed: int = 0, given_tokens: np.ndarray | None = None,
                    batch_size: int | None = None, record_steps: bool = False,
                    timings: dict | None = None) -> Any:
    """``tokens`` (and ``step_tokens`` when recorded) of every sample, gathered on every
    process (see ``token_batches``)."""
    batches = [(share, output) for share, output in self.token_batches(
        schedule, labels, seed, given_tokens, batch_size, record_steps, timings)]
    return jax.tree.map(lambda *parts: np.concatenate(parts), *[
        jax.tree.map(lambda x, s=share: parallel.gather_share(x, s), output)
        for share, output in batches])

  def sample(self, labels: Sequence[int], schedule: ScheduleSpec = BASELINE,
             cache: str | None = None, seed: int = 0, batch_size: int | None = None,
             record_steps: bool = False) -> Samples:
    """Class-conditional samples, one per label (``[0, tokens.num_classes)``; any label when
    the model is unconditional). ``batch_size`` defaults to ``eval.batch_size`` or fewer
    (rounded up to the data-parallel devices) when there are fewer samples."""
    if self.task.num_given:
      raise ValueError(f'this model does {self.task.name}: call predict_frames')
    labels = tasks.conditioning_labels(np.asarray(labels, np.int32).reshape(-1),
                                       self.config.tokens.num_classes, 'labels')
    return self._decode(self.schedule(schedule, cache), labels, None, seed, batch_size,
                        record_steps)

  def predict_frames(self, condition_frames: np.ndarray, labels: Sequence[int] | None = None,
                     schedule: ScheduleSpec = BASELINE, cache: str | None = None,
                     seed: int = 0, batch_size: int | None = None) -> Samples:
    """Clips that continue ``condition_frames`` (uint8 ``[n, config.task.condition_frames, H,
    W, C]``): ``images`` are the decoded ``[n, T, H, W, C]`` clips, condition frames included
    (as the tokenizer reconstructs them)."""
    if not self.task.num_given:
      raise ValueError(f'this model does {self.task.name}: call sample')
    frames = np.asarray(condition_frames)
    data = self.config.data
    expected = (self.config.task.condition_frames, data.image_size, data.image_size,
                data.channels)
    if frames.ndim != 5 or frames.shape[1:] != expected or frames.dtype != np.uint8:
      raise ValueError(f'condition_frames has shape {frames.shape} and dtype {frames.dtype}; '
                       f'expected uint8 [n, {", ".join(map(str, expected))}] '
                       '(config.task.condition_frames, config.data.image_size, channels)')
    labels = np.zeros(len(frames), np.int32) if labels is None else np.asarray(labels, np.int32)
    labels = tasks.conditioning_labels(labels, self.config.tokens.num_classes, 'labels')
    return self._decode(self.schedule(schedule, cache), labels, self.encode_condition(frames),
                        seed, batch_size, False)

  def _decode(self, schedule, labels, given_tokens, seed, batch_size, record_steps) -> Samples:
    if batch_size is None:
      devices = parallel.data_parallel_size(self.mesh)
      batch_size = min(self.config.eval.batch_size, -(-len(labels) // devices) * devices)
    timings = {}
    output = self.sample_tokens(labels, schedule, seed, given_tokens, batch_size, record_steps,
                                timings)
    flops = self.flops(schedule)
    return Samples(
        images=self.decode(output['tokens'], batch_size), tokens=output['tokens'],
        labels=labels,
        schedule=schedule.name, cache=schedule.cache,
        gflops_per_sample=flops['gflops_per_sample'], flop_ratio=flops['flop_ratio'],
        seconds=float(sum(timings['batch_seconds'])),
        compile_seconds=timings['compile_seconds'],
        step_widths=[step.width_factor for step in self.plan(schedule)],
        step_tokens=output['step_tokens'])

  # -- the tokenizer -----------------------------------------------------------------------------

  def decode(self, tokens: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    """Token ids ``[n, N]`` (the same on every process) -> all the uint8 images or clips on
    every process, each process decoding its share. Masked positions (``mask_id``) decode as
    code 0."""
    tokens = np.where(np.asarray(tokens) == self.mask_id, 0, tokens)
    batch_size = batch_size or self.config.eval.batch_size
    return np.concatenate([
        parallel.gather_share(tokenizer.decode_tokens(
            self.config, self.tokenizer_params, share.take(tokens), self.mesh), share)
        for share in parallel.row_shares(len(tokens), batch_size, self.mesh)])

  def encode_condition(self, frames: np.ndarray) -> np.ndarray:
    """Token ids ``[n, N]`` whose given latent frames encode uint8 ``frames [n, Tc, ...]``:
    the clip is padded to ``data.num_frames`` by repeating its last frame, which the causal
    tokenizer's condition latents never see."""
    pad = self.config.data.num_frames - frames.shape[1]
    clips = np.concatenate([frames] + [frames[:, -1:]] * pad, axis=1).astype(np.uint8)
    batch_size = self.config.eval.batch_size
    return np.concatenate([
        parallel.gather_share(tokenizer.encode_batch(
            self.config, self.tokenizer_params, {'video': share.take(clips)}, self.mesh), share)
        for share in parallel.row_shares(len(clips), batch_size, self.mesh)])

  # -- export --------------------------------------------------------------------------------------

  def save(self, path: str) -> None:
    """One file with the config and both models' parameters, for ``load`` (single process)."""
    payload = dict(config=self.config.to_json(),
                   tokenizer=jax.device_get(self.tokenizer_params),
                   transformer=jax.device_get(self.transformer_params),
                   transformer_weights=self.transformer_weights)
    io_utils.write_bytes(path, flax.serialization.msgpack_serialize(payload))


def config_from_json(text: str) -> ml_collections.ConfigDict:
  config = config_migrations.upgrade(ml_collections.ConfigDict(json.loads(text)))
  config_lib.validate(config)
  return config


def load(path: str, config: ml_collections.ConfigDict | None = None, mesh: Mesh | None = None
         ) -> Generator:
  """The ``Generator`` of a workdir whose tokenizer and transformer finished training (with
  the config the transformer trained with, unless ``config`` is given), or of a file that
  ``Generator.save`` wrote; on ``mesh`` (default: ``parallel.make_mesh(config)``)."""
  if path.endswith('.msgpack'):
    if not io_utils.exists(path):
      raise NotTrainedError(f'{path}: no such model file')
    payload = flax.serialization.msgpack_restore(io_utils.read_bytes(path))
    config = config or config_from_json(payload['config'])
    mesh = parallel.make_mesh(config) if mesh is None else mesh
    place = lambda tree: jax.device_put(tree, parallel.replicated(mesh))
    return Generator(config, place(payload['tokenizer']), place(payload['transformer']), mesh,
                     payload.get('transformer_weights', restore.TRAINED))
  transformer_dir = checkpoints.checkpoint_dir(path, checkpoints.TRANSFORMER)
  checkpointer = (checkpoints.Checkpointer(transformer_dir)
                  if io_utils.exists(transformer_dir) else None)
  if checkpointer is None or checkpointer.latest_step() is None:
    raise NotTrainedError(f'{path} holds no trained transformer ({transformer_dir} has no '
                          'checkpoint); train one with --mode=train')
  if config is None:
    config = config_from_json(json.dumps(checkpointer.restore_config()))
  for name, trained, steps in (
      ('tokenizer', restore.tokenizer_is_trained, config.tokenizer_training.num_steps),
      ('transformer', restore.transformer_is_trained, config.training.num_steps)):
    if not trained(config, path):
      raise NotTrainedError(f'{path}: the {name} has not finished training ({steps} steps); '
                            'run the job (or its --mode) to the end first')
  weights = restore.transformer_weights(path)
  logging.info('Loading the tokenizer and transformer of %s (the transformer\'s %s)', path,
               'weight average' if weights == restore.EMA else 'trained weights')
  mesh = parallel.make_mesh(config) if mesh is None else mesh
  return Generator(config, restore.tokenizer_params(config, path, mesh),
                   restore.transformer_params(config, path, mesh, weights), mesh, weights)
