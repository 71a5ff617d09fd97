"""One process of a multi-host CPU run; ``tests/integration/test_parallel.py`` starts two of them.

Run as ``python tests/helpers/multihost_checks.py WORKDIR`` with ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` and
``XLA_FLAGS=--xla_force_host_platform_device_count=2`` set. Each process reads its own grain
shard (``sources.resumable_batches``), and together they train the tiny transformer through
``train_transformer.train`` on a mesh whose ``fsdp`` axis spans both processes: a preempted
first run, then a resumed one; then they decode a batch split across them. Prints one JSON
line: per-step losses, a checksum of the final parameters, whether the checkpoint restores them
exactly, and the decoded tokens (gathered) with whether they equal an unsplit decode.
"""

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import parallel_checks

from nested_decode import config_lib, parallel
from nested_decode.data import pipeline
from nested_decode.decoding.sampler import Decoder
from nested_decode.inference import restore
from nested_decode.models.transformer import NestedMaskedTransformer
from nested_decode.training import train_transformer

jax.config.update('jax_default_matmul_precision', 'highest')


def token_source() -> pipeline.ArraySource:
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, 64).astype(np.int32)
  tokens = ((labels[:, None] * 5 + np.arange(16)[None]) % 16).astype(np.int32)
  return pipeline.ArraySource('synthetic-tokens', tokens=tokens, label=labels)


def config_for_test():
  config = parallel_checks.tiny_config()
  config.training.num_steps = 5
  config.training.checkpoint_every = 2
  config.training.widths = (1,)  # one width: this checks the processes, not the nesting
  config.mesh.update(data=1, fsdp=-1, tensor=1)  # parameters split across the two processes
  return config


MAKE_TRAIN_STEP = train_transformer.make_train_step


def recording_steps(losses: dict):
  """Wraps ``train_transformer.make_train_step`` to note every step's loss (metrics are
  written by process 0 only)."""
  make = MAKE_TRAIN_STEP

  def make_recording(*args, **kwargs):
    step = make(*args, **kwargs)

    def recorded(state, batch):
      state, metrics = step(state, batch)
      losses[int(state.step)] = float(metrics['loss'])
      return state, metrics
    return recorded
  return make_recording


def main(workdir: str) -> None:
  from nested_decode.data import sources
  config = config_for_test()
  first, resumed = {}, {}
  batches = sources.resumable_batches(token_source(), None, config.training.batch_size,
                                     config.seed)
  started = time.perf_counter()
  seconds = {}
  train_transformer.make_train_step = recording_steps(first)
  mesh = parallel.make_mesh(config)
  train_transformer.train(config, workdir, *batches, mesh, stop_after=3)  # saved at 2, lost 3
  seconds['first'] = time.perf_counter() - started
  train_transformer.make_train_step = recording_steps(resumed)
  final = train_transformer.train(config, workdir, *batches, mesh)
  seconds['resumed'] = time.perf_counter() - started
  restored = restore.transformer_params(config, workdir, mesh)
  same = jax.jit(lambda a, b: jnp.all(jnp.stack([jnp.array_equal(x, y) for x, y in zip(
      jax.tree.leaves(a), jax.tree.leaves(b))])))(final.params, restored)
  checksum = jax.jit(lambda p: sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(p)))(
      final.params)
  kernel = final.params['params']['layers']['mlp_in']['kernel']

  # Decoding a global batch split across the processes, against every process decoding it all.
  model = NestedMaskedTransformer(config_lib.transformer_config(config))
  plan = config_lib.check_schedule(config, config.eval.schedules.small, 'small').plan(
      config_lib.decode_task(config))
  decode = Decoder(model, config_lib.sampling_options(config))
  labels = np.arange(16, dtype=np.int32) % 3
  init = np.full((16, model.config.seq_len), model.config.mask_id, np.int32)
  mesh = parallel.make_mesh(config)
  rows = parallel.local_rows(len(labels), mesh)
  batch = parallel.shard_batch({'init': init[rows], 'labels': labels[rows]}, mesh)
  rng = jax.random.PRNGKey(1)
  split = parallel.to_host(decode(final.params, batch['init'], batch['labels'], rng, plan).tokens)
  whole = parallel.to_host(decode(final.params, jnp.asarray(init), jnp.asarray(labels), rng,
                                  plan).tokens)
  seconds['decode'] = time.perf_counter() - started

  # Rows of global batches shared out, computed where they live and gathered back in order.
  shares = list(parallel.row_shares(10, 8, mesh))  # [0, 8) and a padded [8, 10)
  computed = [parallel.apply_to_local_rows(lambda x: x * 10, mesh, share.take(np.arange(10)))
              for share in shares]
  gathered = [parallel.gather_share(c, share).tolist() for c, share in zip(computed, shares)]
  print('RESULT ' + json.dumps(dict(
      process=jax.process_index(), processes=jax.process_count(),
      devices=jax.device_count(), local_devices=jax.local_device_count(),
      first={str(k): v for k, v in sorted(first.items())},
      resumed={str(k): v for k, v in sorted(resumed.items())},
      checksum=float(checksum), restored_equal=bool(same),
      kernel_shape=list(kernel.shape),
      kernel_local_shards=[list(s.data.shape) for s in kernel.addressable_shards],
      kernel_spec=str(kernel.sharding.spec), local_rows=[rows.start, rows.stop],
      decoded=split.tolist(), decoded_equal=bool(np.array_equal(split, whole)),
      share_rows=[share.rows.tolist() for share in shares],
      share_valid=[share.valid.tolist() for share in shares],
      computed=[c.tolist() for c in computed], gathered=gathered,
      seconds=dict(seconds, end=time.perf_counter() - started))), flush=True)


if __name__ == '__main__':
  # Before anything else uses JAX: the cluster must form before the backends start.
  assert parallel.initialize_distributed(), 'set JAX_COORDINATOR_ADDRESS etc. (see above)'
  main(sys.argv[1])
