"""``--mode=bench_train``: the speed of the training steps, read through the real loaders.

Three benchmarks, each a fresh train state, the trainer's own compiled step and its own batch
preparation (``parallel.shard_batch``), fed by the loader the training stage uses:

- ``transformer_single``: the masked transformer at full width only (``training.widths=(1,)``:
  one forward and backward, no distillation);
- ``transformer_nested``: the config's ``training.widths`` (the nested objective);
- ``tokenizer``: the VQ tokenizer's step on the config's pixel pipeline (source, transform,
  ``config.data.worker_count`` grain workers), the only trainer that reads pixels.

The transformer trains on token ids the tokenizer has encoded; those come from an in-memory
array, so the benchmark feeds it seeded random ids of the same shape through the same token
loader (a step's cost does not depend on the ids), and needs no trained tokenizer.

How each row is measured: ``bench.train_warmup_steps`` steps first (the first one compiles; its
time, with the loader's start, is ``first_step_seconds``), then ``bench.train_steps`` timed
steps, blocked on at the end. ``step_seconds`` is the timed wall time over the steps; the host
time spent inside ``next(iterator)`` is ``data_wait_seconds`` and its share of the wall time
``data_wait_fraction``: the time the step loop could not dispatch work because the next batch
was not ready (steps are dispatched asynchronously, so this is what input costs the trainer).
``nested_over_single`` is the nested step time over the single-width one, to compare with
what it would be if time followed FLOPs: ``dense_flop_ratio`` counts only the width-sliced
dense layers (quadratic in the width: ``sum(1 / p**2)`` over the factors ``p``, 1.33 for
1, 2, 4, 8); ``flop_ratio`` counts a whole forward pass of each width (``models/flops.py``:
attention and the elementwise work too, which shrink only linearly with the width; the
backward pass scales alike), the bound for models whose sequence is long next to their width.
"""

import copy
import time
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from nested_decode import config_lib, parallel, tasks
from nested_decode.data import pipeline
from nested_decode.data.sources import data_sources, resumable_batches, worker_options
from nested_decode.inference import tokenizer
from nested_decode.models.flops import pass_flops
from nested_decode.models.transformer import NestedMaskedTransformer
from nested_decode.training import train_tokenizer, train_transformer


def time_steps(step: Callable[[Any, Any], tuple[Any, dict]], state: Any,
               iterator: Iterator[dict], prepare: Callable[[dict], Any], warmup: int,
               steps: int, batch_size: int) -> dict:
  """A row of measurements of ``steps`` steps after ``warmup`` (see the module docstring)."""
  start = time.perf_counter()
  for index in range(warmup):
    state, _ = step(state, prepare(next(iterator)))
    jax.block_until_ready(state)
    if index == 0:
      first_step = time.perf_counter() - start
  waited = 0.0
  start = time.perf_counter()
  for _ in range(steps):
    before = time.perf_counter()
    batch = next(iterator)
    waited += time.perf_counter() - before
    state, _ = step(state, prepare(batch))
  jax.block_until_ready(state)
  total = time.perf_counter() - start
  return dict(batch_size=batch_size, steps=steps, step_seconds=total / steps,
              steps_per_second=steps / total, examples_per_second=steps * batch_size / total,
              data_wait_seconds=waited, data_wait_fraction=waited / total,
              first_step_seconds=first_step)


def random_token_source(config: ml_collections.ConfigDict, rows: int) -> pipeline.ArraySource:
  """Seeded random token ids and the model's labels, shaped like the encoded training set."""
  rng = np.random.default_rng(config.seed)
  labels = rng.integers(0, max(config.tokens.num_classes, 1), rows)
  return pipeline.ArraySource(
      f'random_tokens/{config.data.name}/{rows}',
      tokens=rng.integers(0, config.tokens.codebook_size, (rows, config_lib.seq_len(config)),
                          dtype=np.int32),
      label=tasks.conditioning_labels(labels, config.tokens.num_classes, 'random tokens'))


def transformer_row(config: ml_collections.ConfigDict, mesh: Mesh, widths: tuple[int, ...],
                    warmup: int, steps: int) -> dict:
  config = copy.deepcopy(config)
  config.training.widths = tuple(widths)
  config_lib.validate(config)
  batch_size = config.training.batch_size
  parallel.check_batch_size(batch_size, mesh, 'training.batch_size')
  model = NestedMaskedTransformer(config_lib.transformer_config(config))
  source = random_token_source(config, batch_size * (warmup + steps))
  make_iterator, _ = resumable_batches(source, None, batch_size, config.seed)
  row = time_steps(train_transformer.make_train_step(config, model, mesh),
                   train_transformer.create_train_state(config, model, mesh), make_iterator(None),
                   lambda batch: parallel.shard_batch(batch, mesh), warmup, steps, batch_size)
  return dict(widths=list(widths), worker_count=0, **row)  # tokens: read in this process


def tokenizer_row(config: ml_collections.ConfigDict, mesh: Mesh, warmup: int, steps: int
                  ) -> dict:
  batch_size = config.tokenizer_training.batch_size
  parallel.check_batch_size(batch_size, mesh, 'tokenizer_training.batch_size')
  train, _, transform, _ = data_sources(config, config.tokenizer_training.get('num_frames'))
  workers = worker_options(config)
  make_iterator, _ = resumable_batches(train, transform, batch_size, config.seed,
                                       key='tokenizer_training.batch_size', **workers)
  row = time_steps(
      train_tokenizer.make_train_step(config, mesh), train_tokenizer.create_state(config, mesh),
      make_iterator(None),  # its worker processes end with it, when this returns
      lambda batch: parallel.shard_batch(tokenizer.host_inputs(config, batch), mesh),
      warmup, steps, batch_size)
  return dict(**workers, **row)


def flop_ratio(config: ml_collections.ConfigDict, widths: tuple[int, ...]) -> float:
  """Forward FLOPs of a training pass at every width of ``widths`` over the full width's."""
  model = config_lib.transformer_config(config)
  n = model.seq_len
  flops = lambda p: pass_flops(model, p, num_queries=n + 1, num_keys=n + 1, num_logits=n).total
  return sum(flops(p) for p in widths) / flops(1)


def bench_train(config: ml_collections.ConfigDict, mesh: Mesh,
                log: Callable[..., None] = print) -> dict:
  """The report ``--mode=bench_train`` writes to ``bench_train.json``."""
  bench = config.bench
  warmup, steps = bench.get('train_warmup_steps', 2), bench.get('train_steps', 20)
  widths = tuple(sorted(set(config.training.widths)))
  rows = {}
  for name, make_row in (
      ('transformer_single', lambda: transformer_row(config, mesh, (1,), warmup, steps)),
      ('transformer_nested', lambda: transformer_row(config, mesh, widths, warmup, steps)),
      ('tokenizer', lambda: tokenizer_row(config, mesh, warmup, steps))):
    rows[name] = make_row()
    log(f'bench_train {name}: {rows[name]}')
  single, nested = rows['transformer_single'], rows['transformer_nested']
  return dict(
      rows=rows,
      nested_over_single=nested['step_seconds'] / single['step_seconds'],
      dense_flop_ratio=sum(1 / p ** 2 for p in widths),
      flop_ratio=flop_ratio(config, widths),
      max_data_wait_fraction=max(row['data_wait_fraction'] for row in rows.values()))
