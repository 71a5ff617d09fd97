r"""One of two JAX processes on this machine (a CPU "cluster" over gloo), for the multi-process
fault tests:

  python tests/helpers/two_processes.py stop PORT PROCESS_ID USE_JAX_PREEMPTION_SERVICE(0|1) \\
      READY_FILE

steps a loop that asks ``loop.StopRequest`` after every step whether to stop; writes READY_FILE
after a few steps and prints ``stopped at step N (REASON)`` when told to stop.

  python tests/helpers/two_processes.py checkpoint PORT PROCESS_ID DIRECTORY

saves a replicated array with the data position ``{'position': 10 + PROCESS_ID}`` through
``Checkpointer``, restores it and prints ``position P``.
"""

import sys
import time

import jax


def stop(ready: str) -> None:
  from nested_decode.training import loop
  with loop.StopRequest() as request:
    for step in range(1, 1200):
      time.sleep(0.05)
      if step == 3:
        open(ready, 'w').close()
      if request.should_stop(step):
        print(f'stopped at step {step} ({request.received})', flush=True)
        return
  print('never stopped', flush=True)


def checkpoint(directory: str) -> None:
  import ml_collections
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec

  from nested_decode.checkpoints import Checkpointer
  sharding = NamedSharding(jax.make_mesh((2,), ('data',)), PartitionSpec())
  w = jax.make_array_from_callback((4,), sharding, lambda index: np.arange(4.0)[index])
  checkpointer = Checkpointer(directory)
  checkpointer.save(1, {'w': w}, {'position': 10 + jax.process_index()},
                    ml_collections.ConfigDict({'seed': 0}))
  checkpointer.close()
  abstract = {'w': jax.ShapeDtypeStruct((4,), w.dtype, sharding=sharding)}
  state, data, _ = Checkpointer(directory).restore(abstract)
  np.testing.assert_array_equal(state['w'].addressable_data(0), np.arange(4.0))
  print(f"position {data['position']}", flush=True)


def main(argv):
  mode, port, process_id = argv[1], argv[2], int(argv[3])
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if mode == 'stop':
    jax.config.update('jax_enable_preemption_service', argv[4] == '1')
  jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=process_id)
  if mode == 'stop':
    stop(argv[5])
  else:
    checkpoint(argv[4])


if __name__ == '__main__':
  main(sys.argv)
