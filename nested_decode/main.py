r"""Entry point: ``python -m nested_decode.main --config=CFG [--workdir=DIR] [--mode=MODE]``.

DIR (local or ``gs://``) defaults to ``runs/<config>[_<variant>]``, e.g. ``runs/k600_tiny``.
Without ``--mode`` the whole job runs: tokenizer -> transformer -> samples -> eval, each stage
skipped when its final output is already in DIR (and resumed from its checkpoint otherwise).

Modes:
  train_tokenizer  train (or resume) the VQ tokenizer, DIR/tokenizer/;
  train            train (or resume) the nested transformer on tokens, DIR/transformer/;
  sample           per schedule in config.eval.schedules (and the baseline): DIR/samples/;
  eval             DIR/eval.json: GFLOPs, class accuracy and Fréchet distance per schedule;
  export           DIR/model.msgpack: config, tokenizer and transformer in one file for
                   nested_decode.api.load (e.g. the demo notebook's model);
  flops            analytic GFLOPs per sample of each decode, DIR/flops.json;
  bench            the same rows plus measured seconds per batch decode, DIR/bench.json;
  bench_train      steps/s, examples/s and the time spent waiting for data of the train steps
                   (full-width and nested transformer, tokenizer) through the real loaders,
                   DIR/bench_train.json (nested_decode/jobs/bench_train.py says how);
  compile_tpu      compile the train step and every decode ahead of time for the TPU slice
                   config.tpu_fit.topology (e.g. v5e:4x4; needs libtpu, no TPU) and report
                   per-chip memory against HBM and FLOPs, DIR/compile_tpu.json;
  study            quality against compute for a grid of decodes, nested against separate
                   models, DIR/study/ (MNIST);
  scaling_study    the best schedules' quality gap against model width and training steps,
                   with a trend fit, DIR/scaling/ (MNIST);
  search_schedule  beam search for the best schedule within config.search's budget,
                   DIR/search/ (MNIST);
  frontier         per FLOP budget of config.frontier.budgets, the best decode of each family
                   (fewer full-width steps, a sub-model alone, MaGNeTS) chosen on validation
                   digits and scored on the held-out ones, DIR/frontier/ (MNIST).
"""

import logging as pylogging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from nested_decode import config_lib
from nested_decode import io_utils
from nested_decode import parallel
from nested_decode import tasks

MODES = ('all', 'train_tokenizer', 'train', 'sample', 'eval', 'export', 'flops', 'bench',
         'bench_train', 'compile_tpu', 'study', 'scaling_study', 'search_schedule',
         'frontier')

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/k600.py:tiny')
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for outputs, local or gs://BUCKET/...; default: '
    'runs/<config>[_<variant>] (runs/k600_tiny for --config=configs/k600.py:tiny).')
_MODE = flags.DEFINE_enum('mode', 'all', MODES, 'What to run; "all" is the whole job.')
flags.mark_flags_as_required(['config'])


def default_workdir(config_name: str) -> str:
  """``runs/k600_tiny`` for ``configs/k600.py:tiny``, ``runs/mnist`` for ``configs/mnist.py``."""
  path, _, variant = config_name.partition(':')
  stem = os.path.splitext(os.path.basename(path))[0]
  return os.path.join('runs', f'{stem}_{variant}' if variant else stem)


def format_table(rows: list[dict], columns: tuple[str, ...]) -> str:
  columns = [c for c in columns if c in rows[0]]
  lines = [' | '.join(columns)]
  for row in rows:
    cells = [f'{row[c]:.4g}' if isinstance(row[c], float) else str(row[c]) for c in columns]
    lines.append(' | '.join(cells))
  return '\n'.join(lines)


def run_decode_cost(config, config_name: str, workdir: str, mode: str) -> None:
  from nested_decode.evaluation import decode_benchmark
  from nested_decode.jobs import bench_decode
  if mode == 'flops':
    rows = decode_benchmark.flops_rows(config)
  else:
    rows = bench_decode.bench_rows(config, log=logging.info)
  path = io_utils.join(workdir, f'{mode}.json')
  io_utils.write_json(path, dict(config=config_name,
                                 device=decode_benchmark.device_description(), rows=rows))
  print(format_table(rows, ('schedule', 'cache', 'steps', 'gflops_per_sample', 'flop_ratio',
                            'seconds_per_batch', 'speedup')))
  print(f'Wrote {path}')


def run_compile_tpu(config, config_name: str, workdir: str) -> None:
  from nested_decode.jobs import tpu_fit
  try:
    rows = tpu_fit.compile_rows(config, log=logging.info)
  except config_lib.ConfigError as error:  # found only against the topology's devices
    sys.exit(f'Invalid config {config_name}: {error}')
  path = io_utils.join(workdir, 'compile_tpu.json')
  io_utils.write_json(path, dict(config=config_name, rows=rows))
  print(tpu_fit.markdown_table(rows, config_name))
  if any('collective_gib' in row for row in rows):
    print(tpu_fit.collectives_table(rows, config_name))
  print(f'Wrote {path}')


def run_bench_train(config, config_name: str, workdir: str) -> None:
  from nested_decode.evaluation import decode_benchmark
  from nested_decode.jobs import bench_train
  from nested_decode.jobs import stages
  stages.check_data(config, config_name)
  report = bench_train.bench_train(config, log=logging.info)
  path = io_utils.join(workdir, 'bench_train.json')
  io_utils.write_json(path, dict(config=config_name,
                                 device=decode_benchmark.device_description(), **report))
  rows = [dict(step=name, **row) for name, row in report['rows'].items()]
  print(format_table(rows, ('step', 'batch_size', 'step_seconds', 'steps_per_second',
                            'examples_per_second', 'data_wait_fraction', 'worker_count')))
  print(f"nested / single-width step time: {report['nested_over_single']:.3f} (FLOPs: "
        f"{report['flop_ratio']:.3f}; dense layers only: {report['dense_flop_ratio']:.3f})")
  print(f'Wrote {path}')


def run_stages(config, config_name: str, workdir: str, mode: str) -> None:
  from nested_decode.jobs import stages
  from nested_decode.training import train_tokenizer
  if train_tokenizer.is_video(config):
    from nested_decode.jobs import video as job
  else:
    from nested_decode.jobs import image as job
  stages.check_data(config, config_name)
  if mode in ('all', 'eval'):
    stages.check_can_evaluate(config)
  if mode == 'train_tokenizer':
    stages.tokenizer_stage(config, workdir)
  elif mode == 'train':
    stages.transformer_stage(config, workdir)
  elif mode == 'sample':
    job.sample_stage(config, workdir)
  elif mode == 'export':
    path = io_utils.join(workdir, 'model.msgpack')
    stages.generator(config, workdir).save(path)
    print(f'Wrote {path}')
  elif mode == 'study':
    from nested_decode.jobs import study
    study.run_study(config, workdir)
    print(f'Wrote {io_utils.join(workdir, "study")}/results.json, results.md, fd_vs_gflops.png')
  elif mode == 'scaling_study':
    from nested_decode.jobs import scaling_study
    scaling_study.run_scaling_study(config, workdir)
    print(f'Wrote {io_utils.join(workdir, "scaling")}/results.json, results.md, gap_vs_size.png')
  elif mode == 'search_schedule':
    from nested_decode.jobs import schedule_search
    report = schedule_search.search(config, workdir)
    print(f"Found {report['found']} ({report['cache']}); see {workdir}/search/")
  elif mode == 'frontier':
    from nested_decode.jobs import frontier
    frontier.run_frontier(config, workdir)
    print(f'Wrote {io_utils.join(workdir, "frontier")}/results.json, results.md, '
          'fd_vs_gflops.png')
  else:  # 'eval' and the whole job: every stage up to the evaluation
    rows = job.eval_stage(config, workdir)
    print(format_table(rows, ('schedule', 'cache', 'steps', 'gflops_per_sample', 'flop_ratio',
                              'class_accuracy', 'fd', 'fid', 'inception_score', 'fvd')))
    print(f'Wrote {io_utils.join(workdir, "eval.json")}')


def quiet_library_info_logs() -> None:
  """Keeps orbax's, grain's and the Cloud Storage client's per-operation INFO lines out of
  the progress log."""
  def keep(record: pylogging.LogRecord) -> bool:
    noisy = ('/orbax/', '/grain/', '/jax/_src/', '/gcsfs/', '/fsspec/')
    return record.levelno >= pylogging.WARNING or not any(n in record.pathname for n in noisy)
  logging.get_absl_handler().addFilter(keep)


def _innermost_message(error: BaseException) -> str:
  message = error
  while isinstance(message, BaseException) and message.args:
    message = message.args[0]
  return str(message)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with an override of a key the config lacks as one line, not a
  traceback: ``--config.model.widht=3`` names the flag and the key, and suggests one."""
  try:
    return app.parse_flags_with_usage(argv)
  except (KeyError, AttributeError) as error:
    message = _innermost_message(error)
    key = message.splitlines()[0].strip('\'"')
    given = [arg.split('=')[0] for arg in argv[1:]
             if arg.startswith('--config.') and key in arg.split('=')[0].split('.')]
    flag = given[0] if given else 'a --config override'
    hint = ' '.join(message.splitlines()[1:])
    sys.exit(f'FATAL Flags parsing error: {flag}: the config has no key {key!r}. {hint}'.strip())


def run_reporting_faults(run, *args) -> None:
  """``run(*args)``; a fault of the input or the environment ends the process with one line
  naming it instead of a traceback. A preempted trainer (SIGTERM; see training/loop.py) exits
  with status 143 after its checkpoint is written, so schedulers restart the job, and the same
  command resumes it."""
  from nested_decode.training import loop
  from nested_decode.training.checkpoints import CheckpointShapeError
  try:
    run(*args)
  except loop.Preempted as error:
    logging.flush()
    print(f'Preempted: {error}', file=sys.stderr, flush=True)
    sys.exit(error.exit_code)
  except (CheckpointShapeError, FileNotFoundError, NotADirectoryError, PermissionError,
          io_utils.CorruptDataError, FloatingPointError, tasks.LabelError,
          config_lib.ConfigError) as error:
    logging.flush()
    sys.exit(f'{type(error).__name__}: {error}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  quiet_library_info_logs()
  parallel.initialize_distributed()  # on several hosts; before anything else touches JAX
  config = _CONFIG.value
  config_name = config_flags.get_config_filename(flags.FLAGS['config'])
  try:
    config_lib.validate(config)
  except config_lib.ConfigError as error:
    sys.exit(f'Invalid config {config_name}: {error}')
  except (TypeError, ValueError, KeyError, AttributeError) as error:  # a value of a wrong shape
    sys.exit(f'Invalid config {config_name}: {type(error).__name__}: {error}')
  workdir, mode = _WORKDIR.value or default_workdir(config_name), _MODE.value
  try:
    io_utils.ensure_writable_dir(workdir)
  except OSError as error:
    sys.exit(f'--workdir: {error}')
  if mode in ('flops', 'bench'):
    run_reporting_faults(run_decode_cost, config, config_name, workdir, mode)
  elif mode == 'compile_tpu':
    run_reporting_faults(run_compile_tpu, config, config_name, workdir)
  elif mode == 'bench_train':
    run_reporting_faults(run_bench_train, config, config_name, workdir)
  else:
    run_reporting_faults(run_stages, config, config_name, workdir, mode)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
