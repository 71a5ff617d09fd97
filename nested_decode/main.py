r"""Entry point: ``python -m nested_decode.main --config=CFG [--workdir=DIR] [--mode=MODE]``.

DIR (local or ``gs://``) defaults to ``runs/<config>[_<variant>]``, e.g. ``runs/k600_tiny``.
Without ``--mode`` the whole job runs: tokenizer -> transformer -> samples -> eval, each stage
skipped when its final output is already in DIR (and resumed from its checkpoint otherwise).

Modes:
  train_tokenizer  train (or resume) the VQ tokenizer, DIR/tokenizer/;
  eval_tokenizer   video: the tokenizer alone, DIR/tokenizer_eval.json: FVD of its
                   reconstructions of the real clips and, for frame prediction, their PSNR and
                   SSIM beside repeating the last condition frame (tokenizer_frame_metrics.png);
  train            train (or resume) the nested transformer on tokens, DIR/transformer/;
  sample           per schedule in config.eval.schedules (and the baseline): DIR/samples/;
  eval             DIR/eval.json: GFLOPs, class accuracy and Fréchet distance per schedule;
  export           DIR/model.msgpack: config, tokenizer and transformer in one file for
                   nested_decode.api.load (e.g. the demo notebook's model);
  export_tokenizer DIR/tokenizer.msgpack: the trained tokenizer alone, for another job's
                   --config.tokenizer_training.pretrained (it then trains none);
  export_transformer DIR/transformer.msgpack: the trained transformer's sampling weights,
                   for another job's --config.training.init_from (it starts training there);
  flops            analytic GFLOPs per sample of each decode, DIR/flops.json;
  bench            the same rows plus measured seconds per batch decode, DIR/bench.json;
  bench_train      steps/s, examples/s and the time spent waiting for data of the train steps
                   (full-width and nested transformer, tokenizer) through the real loaders,
                   DIR/bench_train.json (nested_decode/tools/bench_train.py says how);
  compile_tpu      compile the train step and every decode ahead of time for the TPU slice
                   config.tpu_fit.topology (e.g. v5e:4x4; needs libtpu, no TPU) and report
                   per-chip memory against HBM and FLOPs, DIR/compile_tpu.json;
  study            quality against compute for a grid of decodes, nested against separate
                   models, DIR/study/ (MNIST);
  scaling_study    the best schedules' quality gap against model width and training steps,
                   with a trend fit, DIR/scaling/ (MNIST);
  search_schedule  beam search for the best schedule within config.search's budget,
                   DIR/search/ (MNIST);
  tune_temperature frame prediction: every schedule at each sampling temperature of
                   config.eval.temperature_sweep on validation clips, and the one to set,
                   DIR/temperature_sweep/ (the test set is not decoded);
  frontier         per FLOP budget of config.frontier.budgets, the best decode of each family
                   (fewer full-width steps, a sub-model alone, MaGNeTS) chosen on validation
                   digits and scored on the held-out ones, DIR/frontier/ (MNIST).
"""

import dataclasses
import functools
import json
import logging as pylogging
import os
import sys
from typing import Callable

import ml_collections
from absl import app, flags, logging
from jax.sharding import Mesh
from ml_collections import config_flags

from nested_decode import config_lib, io_utils, parallel, tasks

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/k600.py:tiny')
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for outputs, local or gs://BUCKET/...; default: '
    'runs/<config>[_<variant>] (runs/k600_tiny for --config=configs/k600.py:tiny).')
flags.mark_flags_as_required(['config'])


def default_workdir(config_name: str) -> str:
  """``runs/k600_tiny`` for ``configs/k600.py:tiny``, ``runs/mnist`` for ``configs/mnist.py``."""
  path, _, variant = config_name.partition(':')
  stem = os.path.splitext(os.path.basename(path))[0]
  return os.path.join('runs', f'{stem}_{variant}' if variant else stem)


def format_table(rows: list[dict], columns: tuple[str, ...]) -> str:
  """``rows`` as text, in those of ``columns`` that some row has (a row without one: blank)."""
  columns = [c for c in columns if any(c in row for row in rows)]
  lines = [' | '.join(columns)]
  for row in rows:
    cells = [f'{row[c]:.4g}' if isinstance(row.get(c), float) else str(row.get(c, ''))
             for c in columns]
    lines.append(' | '.join(cells))
  return '\n'.join(lines)


@dataclasses.dataclass
class Run:
  """What the entry point builds once and every mode shares: the validated config, its name,
  the workdir, and (on first use) the mesh of all devices."""
  config: ml_collections.ConfigDict
  config_name: str
  workdir: str

  @functools.cached_property
  def mesh(self) -> Mesh:
    return parallel.make_mesh(self.config)

  def write_json(self, name: str, report: dict) -> str:
    path = io_utils.join(self.workdir, name)
    io_utils.write_json(path, dict(config=self.config_name, **report))
    return path


def run_flops(run: Run) -> None:
  from nested_decode.inference import decode_cost
  rows = decode_cost.flops_rows(run.config)
  _print_decode_rows(rows, run.write_json('flops.json', dict(
      device=decode_cost.device_description(), rows=rows)))


def run_bench(run: Run) -> None:
  from nested_decode.inference import decode_cost
  from nested_decode.tools import bench_decode
  rows = bench_decode.bench_rows(run.config, run.mesh, log=logging.info)
  _print_decode_rows(rows, run.write_json('bench.json', dict(
      device=decode_cost.device_description(), rows=rows)))


def _print_decode_rows(rows: list[dict], path: str) -> None:
  print(format_table(rows, ('schedule', 'cache', 'steps', 'gflops_per_sample', 'flop_ratio',
                            'seconds_per_batch', 'speedup')))
  print(f'Wrote {path}')


def run_compile_tpu(run: Run) -> None:
  from nested_decode.tools import tpu_fit
  try:
    rows = tpu_fit.compile_rows(run.config, log=logging.info)
  except config_lib.ConfigError as error:  # found only against the topology's devices
    sys.exit(f'Invalid config {run.config_name}: {error}')
  path = run.write_json('compile_tpu.json', dict(rows=rows))
  print(tpu_fit.markdown_table(rows, run.config_name))
  if any('collective_gib' in row for row in rows):
    print(tpu_fit.collectives_table(rows, run.config_name))
  if any('modeled_seconds' in row for row in rows):
    print(tpu_fit.modeled_time_table(rows, run.config_name))
  print(f'Wrote {path}')


def run_bench_train(run: Run) -> None:
  from nested_decode.inference import decode_cost
  from nested_decode.tools import bench_train
  report = bench_train.bench_train(run.config, run.mesh, log=logging.info)
  path = run.write_json('bench_train.json', dict(device=decode_cost.device_description(),
                                                 **report))
  rows = [dict(step=name, **row) for name, row in report['rows'].items()]
  print(format_table(rows, ('step', 'batch_size', 'step_seconds', 'steps_per_second',
                            'examples_per_second', 'data_wait_fraction', 'worker_count')))
  print(f"nested / single-width step time: {report['nested_over_single']:.3f} (FLOPs: "
        f"{report['flop_ratio']:.3f}; dense layers only: {report['dense_flop_ratio']:.3f})")
  print(f'Wrote {path}')


def pipeline_job(config: ml_collections.ConfigDict):
  """The module of the config's job: the image job or the video job."""
  from nested_decode.inference import tokenizer
  if tokenizer.is_video(config):
    from nested_decode.pipeline import video
    return video
  from nested_decode.pipeline import image
  return image


def run_train_tokenizer(run: Run) -> None:
  from nested_decode.pipeline import stages
  stages.tokenizer_stage(run.config, run.workdir, run.mesh)


def run_eval_tokenizer(run: Run) -> None:
  from nested_decode.inference import tokenizer
  if not tokenizer.is_video(run.config):
    raise config_lib.ConfigError(
        f'--mode=eval_tokenizer scores video tokenizers; {run.config_name} is an image config, '
        'whose --mode=eval scores the reconstructions beside the samples')
  from nested_decode.pipeline import video
  report = video.tokenizer_eval_stage(run.config, run.workdir, run.mesh)
  print(json.dumps(report, indent=1))
  print(f'Wrote {io_utils.join(run.workdir, "tokenizer_eval.json")}')


def run_train(run: Run) -> None:
  from nested_decode.pipeline import stages
  stages.transformer_stage(run.config, run.workdir, run.mesh)


def run_sample(run: Run) -> None:
  pipeline_job(run.config).sample_stage(run.config, run.workdir, run.mesh)


def run_export(run: Run) -> None:
  from nested_decode.pipeline import stages
  path = io_utils.join(run.workdir, 'model.msgpack')
  stages.generator(run.config, run.workdir, run.mesh).save(path)
  print(f'Wrote {path}')


def require_trained(trained: bool, workdir: str, model: str, steps: int, mode: str) -> None:
  """An export's check that ``workdir``'s ``model`` finished its ``steps`` (``--mode=mode``)."""
  if not trained:
    raise config_lib.ConfigError(f'{workdir} holds no trained {model} ({steps} steps); train one '
                                 f'with --mode={mode} first')


def run_export_tokenizer(run: Run) -> None:
  from nested_decode.inference import restore, tokenizer_file
  require_trained(restore.tokenizer_is_trained(run.config, run.workdir), run.workdir,
                  'tokenizer', run.config.tokenizer_training.num_steps, 'train_tokenizer')
  path = io_utils.join(run.workdir, 'tokenizer.msgpack')
  params = restore.tokenizer_params(run.config, run.workdir, run.mesh)
  tokenizer_file.write(run.config, params, path)
  print(f'Wrote {path}')


def run_export_transformer(run: Run) -> None:
  from nested_decode.inference import restore, transformer_file
  require_trained(restore.transformer_is_trained(run.config, run.workdir), run.workdir,
                  'transformer', run.config.training.num_steps, 'train')
  path = io_utils.join(run.workdir, 'transformer.msgpack')
  transformer_file.write(run.config, restore.tokenizer_params(run.config, run.workdir, run.mesh),
                         restore.transformer_params(run.config, run.workdir, run.mesh), path)
  print(f'Wrote {path}')


def run_eval(run: Run) -> None:
  """The whole job (and ``--mode=eval``): every stage up to the evaluation."""
  rows = pipeline_job(run.config).eval_stage(run.config, run.workdir, run.mesh)
  print(format_table(rows, ('schedule', 'cache', 'steps', 'gflops_per_sample', 'flop_ratio',
                            'class_accuracy', 'fd', 'fid', 'inception_score', 'fvd',
                            'fvd_minus_baseline', 'fvd_minus_baseline_se')))
  print(f'Wrote {io_utils.join(run.workdir, "eval.json")}')


def run_study(run: Run) -> None:
  from nested_decode.studies import study
  study.run_study(run.config, run.workdir, run.mesh)
  print(f'Wrote {io_utils.join(run.workdir, "study")}/results.json, results.md, '
        'fd_vs_gflops.png')


def run_scaling_study(run: Run) -> None:
  from nested_decode.studies import scaling_study
  scaling_study.run_scaling_study(run.config, run.workdir, run.mesh)
  print(f'Wrote {io_utils.join(run.workdir, "scaling")}/results.json, results.md, '
        'gap_vs_size.png')


def run_search_schedule(run: Run) -> None:
  from nested_decode.studies import schedule_search
  report = schedule_search.search(run.config, run.workdir, run.mesh)
  print(f"Found {report['found']} ({report['cache']}); see {run.workdir}/search/")


def run_recipe_study(run: Run) -> None:
  from nested_decode.studies import recipe_study
  recipe_study.run_recipe_study(run.config, run.workdir, run.mesh)
  print(f'Wrote {io_utils.join(run.workdir, "recipe_study")}/results.json, results.md')


def run_tune_temperature(run: Run) -> None:
  from nested_decode.studies import temperature_sweep
  report = temperature_sweep.run_temperature_sweep(run.config, run.workdir, run.mesh)
  print(f"Chosen on validation clips: --config.sampling.temperature={report['chosen']:g}; see "
        f"{io_utils.join(run.workdir, 'temperature_sweep')}/results.md")


def run_frontier(run: Run) -> None:
  from nested_decode.studies import frontier
  frontier.run_frontier(run.config, run.workdir, run.mesh)
  print(f'Wrote {io_utils.join(run.workdir, "frontier")}/results.json, results.md, '
        'fd_vs_gflops.png')


@dataclasses.dataclass(frozen=True)
class Mode:
  run: Callable[[Run], None]
  reads_data: bool = False  # checks first that the config's data are where it says
  evaluates: bool = False   # gets what the evaluation needs first (the FID network's weights)


MODES = {
    'all': Mode(run_eval, reads_data=True, evaluates=True),
    'train_tokenizer': Mode(run_train_tokenizer, reads_data=True),
    'eval_tokenizer': Mode(run_eval_tokenizer, reads_data=True),
    'train': Mode(run_train, reads_data=True),
    'sample': Mode(run_sample, reads_data=True),
    'eval': Mode(run_eval, reads_data=True, evaluates=True),
    'export': Mode(run_export, reads_data=True),
    'export_tokenizer': Mode(run_export_tokenizer),
    'export_transformer': Mode(run_export_transformer),
    'flops': Mode(run_flops),
    'bench': Mode(run_bench),
    'bench_train': Mode(run_bench_train, reads_data=True),
    'compile_tpu': Mode(run_compile_tpu),
    'study': Mode(run_study, reads_data=True),
    'scaling_study': Mode(run_scaling_study, reads_data=True),
    'search_schedule': Mode(run_search_schedule, reads_data=True),
    'frontier': Mode(run_frontier, reads_data=True),
    'tune_temperature': Mode(run_tune_temperature, reads_data=True, evaluates=True),
    'recipe_study': Mode(run_recipe_study, reads_data=True),
}
_MODE = flags.DEFINE_enum('mode', 'all', list(MODES), 'What to run; "all" is the whole job.')


def run_mode(mode: Mode, run: Run) -> None:
  if mode.reads_data:
    from nested_decode.pipeline import stages
    stages.check_data(run.config, run.config_name)
    if mode.evaluates:
      stages.check_can_evaluate(run.config)
  mode.run(run)


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
  from nested_decode.checkpoints import CheckpointShapeError
  from nested_decode.training import loop
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
  run_reporting_faults(run_mode, MODES[mode], Run(config, config_name, workdir))

if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
