r"""Entry point: ``python -m nested_decode.main --config=CFG --workdir=DIR --mode=MODE``.

Modes:
  flops  analytic GFLOPs per sample of the decode, baseline and every config.eval.schedules
         entry, written to DIR/flops.json;
  bench  the same rows plus measured seconds per batch decode and speedups, DIR/bench.json.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from nested_decode import config_lib
from nested_decode import io_utils

MODES = ('flops', 'bench')

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/k600.py:tiny')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for outputs.')
_MODE = flags.DEFINE_enum('mode', 'bench', MODES, 'What to run.')
flags.mark_flags_as_required(['config', 'workdir'])


def format_table(rows: list[dict]) -> str:
  columns = [c for c in ('schedule', 'cache', 'steps', 'gflops_per_sample', 'flop_ratio',
                         'seconds_per_batch', 'speedup') if c in rows[0]]
  lines = [' | '.join(columns)]
  for row in rows:
    cells = [f'{row[c]:.4g}' if isinstance(row[c], float) else str(row[c]) for c in columns]
    lines.append(' | '.join(cells))
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  try:
    config_lib.validate(config)
  except config_lib.ConfigError as error:
    sys.exit(f'Invalid config {config_flags.get_config_filename(flags.FLAGS["config"])}: {error}')
  workdir, mode = _WORKDIR.value, _MODE.value
  os.makedirs(workdir, exist_ok=True)

  from nested_decode.evaluation import decode_benchmark  # imports jax: after flag parsing
  if mode == 'flops':
    rows = decode_benchmark.flops_rows(config)
  else:
    rows = decode_benchmark.bench_rows(config, log=logging.info)
  path = os.path.join(workdir, f'{mode}.json')
  io_utils.write_json(path, dict(config=config_flags.get_config_filename(flags.FLAGS['config']),
                                 device=decode_benchmark.device_description(), rows=rows))
  print(format_table(rows))
  print(f'Wrote {path}')


if __name__ == '__main__':
  app.run(main)
