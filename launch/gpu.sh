#!/usr/bin/env bash
# Launch nested_decode on GPUs: one multi-GPU node, or several nodes through SLURM.
# Run `launch/gpu.sh --help` for the flags.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage:
  launch/gpu.sh local --config CONFIG --workdir DIR [--dry-run] [-- EXTRA_ARGS...]
  launch/gpu.sh slurm --nodes N --gpus-per-node G --config CONFIG --workdir DIR
                      [--partition P] [--time T] [--account A] [--job-name NAME]
                      [--cpus-per-task C] [--setup CMD] [--dry-run] [-- EXTRA_ARGS...]

Both run  python -m nested_decode.main --config=CONFIG --workdir=DIR EXTRA_ARGS...
from the current directory (like the README's commands; CONFIG and a relative DIR are
relative to it). nested_decode must be installed in the Python that runs it
(pip install -e ".[tf]" plus a CUDA jax, e.g. pip install "jax[cuda12]").

local   One process on this machine that drives all its GPUs (limit them with
        CUDA_VISIBLE_DEVICES); no jax.distributed set-up is needed.

slurm   Writes an sbatch script and submits it with sbatch. One process per node, each
        driving all G GPUs of its node: srun starts N tasks (--ntasks-per-node=1), and
        jax.distributed.initialize() finds the others from SLURM_NTASKS, SLURM_PROCID and
        SLURM_STEP_NODELIST (coordinator: the first node). The script sets
        JAX_LOCAL_DEVICE_IDS=0,...,G-1, since under SLURM jax would otherwise give each
        process only the GPU numbered SLURM_LOCALID. The current directory must be on a
        file system every node sees. The script and the job's output go to DIR/slurm/
        (to ./runs/slurm/ when DIR is a gs:// path); both paths are printed.

Options:
  --config PATH[:VARIANT]  Config file, e.g. configs/k600.py or configs/k600.py:tiny.
  --workdir DIR            Output directory (local path on a shared file system, or gs://).
  --nodes N                slurm: number of nodes.
  --gpus-per-node G        slurm: GPUs per node (#SBATCH --gpus-per-node).
  --partition P            slurm: partition (default: the cluster's default).
  --time T                 slurm: time limit, e.g. 24:00:00 (default: the partition's).
  --account A              slurm: account to charge.
  --job-name NAME          slurm: job name (default nested_decode).
  --cpus-per-task C        slurm: CPUs for each node's process; set it (e.g. to the
                           node's core count) where SLURM would otherwise pin the
                           process, input pipeline included, to one core.
  --setup CMD              slurm: shell line run in the job before srun, e.g.
                           "source .venv/bin/activate" or "module load cuda/12".
  --dry-run                Print the commands (and the sbatch script) prefixed with
                           "+ " instead of running them.
  -h, --help               Show this help.
  -- EXTRA_ARGS...         Passed to nested_decode.main unchanged.

Environment:
  PYTHON                          Interpreter (default python3).
  XLA_PYTHON_CLIENT_MEM_FRACTION  Share of each GPU's memory jax preallocates; set to
                                  0.9 unless already set (jax's own default is 0.75).
                                  XLA_PYTHON_CLIENT_PREALLOCATE=false allocates on
                                  demand instead, at some cost in speed.
EOF
}

LAUNCHER=gpu.sh
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if (($# == 0)); then
  usage >&2
  exit 2
fi

mode=''
config='' workdir='' nodes='' gpus_per_node='' partition='' time_limit='' account=''
job_name=nested_decode cpus_per_task='' setup=''
extra_args=()

slurm_flags=''
slurm_only() {
  slurm_flags+=" $1"
}

while (($#)); do
  case $1 in
    --) shift; extra_args=("$@"); break ;;
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
  esac
  case $1 in
    -h | --help) usage; exit 0 ;;
    --config) need_value "$@"; config=$2; shift ;;
    --workdir) need_value "$@"; workdir=$2; shift ;;
    --nodes) slurm_only "$1"; need_value "$@"; nodes=$2; shift ;;
    --gpus-per-node) slurm_only "$1"; need_value "$@"; gpus_per_node=$2; shift ;;
    --partition) slurm_only "$1"; need_value "$@"; partition=$2; shift ;;
    --time) slurm_only "$1"; need_value "$@"; time_limit=$2; shift ;;
    --account) slurm_only "$1"; need_value "$@"; account=$2; shift ;;
    --job-name) slurm_only "$1"; need_value "$@"; job_name=$2; shift ;;
    --cpus-per-task) slurm_only "$1"; need_value "$@"; cpus_per_task=$2; shift ;;
    --setup) slurm_only "$1"; need_value "$@"; setup=$2; shift ;;
    --dry-run) dry_run=1 ;;
    local | slurm)
      [[ -z $mode ]] || die "give one mode, local or slurm (got '$mode' and '$1')"
      mode=$1 ;;
    *) die "unknown argument '$1' (the mode is local or slurm; arguments for nested_decode.main go after --; see --help)" ;;
  esac
  shift
done

case $mode in
  local) [[ -z $slurm_flags ]] || die "$slurm_flags: slurm options, not for local (see --help)" ;;
  slurm) ;;
  *) die "say which mode: launch/gpu.sh local ... or launch/gpu.sh slurm ... (see --help)" ;;
esac
[[ -n $config ]] || die "--config is required, e.g. configs/k600.py (see --help)"
[[ -n $workdir ]] || die "--workdir is required (see --help)"
[[ -f ${config%%:*} ]] || die "--config: no file '${config%%:*}' (relative to $PWD)"

py=${PYTHON:-python3}
mem_fraction=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
main=("$py" -m nested_decode.main "--config=$config" "--workdir=$workdir"
  ${extra_args[@]+"${extra_args[@]}"})

if [[ $mode == local ]]; then
  if ((dry_run)); then
    run env "XLA_PYTHON_CLIENT_MEM_FRACTION=$mem_fraction" "${main[@]}"
  else
    export XLA_PYTHON_CLIENT_MEM_FRACTION=$mem_fraction
    exec "${main[@]}"
  fi
  exit 0
fi

# slurm
positive_int() {  # FLAG VALUE
  [[ -n $2 ]] || die "$1 is required for slurm (see --help)"
  [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer (got '$2')"
}
positive_int --nodes "$nodes"
positive_int --gpus-per-node "$gpus_per_node"
if [[ -n $cpus_per_task ]]; then
  positive_int --cpus-per-task "$cpus_per_task"
fi
for value in "$partition" "$time_limit" "$account" "$job_name"; do
  [[ $value != *[[:space:]]* ]] || die "SLURM option values cannot contain spaces (got '$value')"
done

if [[ $workdir == gs://* ]]; then
  slurm_dir=$PWD/runs/slurm
elif [[ $workdir == /* ]]; then
  slurm_dir=$workdir/slurm
else
  slurm_dir=$PWD/$workdir/slurm
fi
script=$slurm_dir/$job_name-$(date -u +%Y%m%d-%H%M%S).sbatch

device_ids=0
for ((i = 1; i < gpus_per_node; i++)); do
  device_ids+=",$i"
done

srun_args=(srun "--nodes=$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1)
if [[ -n $cpus_per_task ]]; then
  srun_args+=("--cpus-per-task=$cpus_per_task")  # srun does not inherit it from sbatch
fi

sbatch_text=$(
  echo '#!/bin/bash'
  echo "#SBATCH --job-name=$job_name"
  echo "#SBATCH --nodes=$nodes"
  echo '#SBATCH --ntasks-per-node=1'
  echo "#SBATCH --gpus-per-node=$gpus_per_node"
  if [[ -n $cpus_per_task ]]; then echo "#SBATCH --cpus-per-task=$cpus_per_task"; fi
  if [[ -n $partition ]]; then echo "#SBATCH --partition=$partition"; fi
  if [[ -n $time_limit ]]; then echo "#SBATCH --time=$time_limit"; fi
  if [[ -n $account ]]; then echo "#SBATCH --account=$account"; fi
  echo "#SBATCH --output=$slurm_dir/%x-%j.out"
  echo "#SBATCH --chdir=$PWD"
  echo "# Written by launch/gpu.sh. One process per node, each driving the node's $gpus_per_node GPUs;"
  echo '# jax.distributed.initialize() reads SLURM_NTASKS, SLURM_PROCID and SLURM_STEP_NODELIST.'
  echo 'set -eo pipefail'
  if [[ -n $setup ]]; then printf '%s\n' "$setup"; fi
  echo 'set -u'
  echo "# Without this jax gives each process only GPU number SLURM_LOCALID."
  echo "export JAX_LOCAL_DEVICE_IDS=$device_ids"
  echo "export XLA_PYTHON_CLIENT_MEM_FRACTION=$(shquote "$mem_fraction")"
  echo 'export PYTHONUNBUFFERED=1'
  join_words "${srun_args[@]}" "${main[@]}"
)

if ((dry_run)); then
  run mkdir -p "$slurm_dir"
  printf "+ cat > %s <<'EOF'\n" "$(shquote "$script")"
  printf '%s\n' "$sbatch_text"
  echo 'EOF'
  run sbatch "$script"
else
  command -v sbatch >/dev/null 2>&1 || die "sbatch not found on PATH (run this on a SLURM login node, or use --dry-run)"
  mkdir -p "$slurm_dir"
  printf '%s\n' "$sbatch_text" >"$script"
  note "wrote $script"
  sbatch "$script"
  note "output: $slurm_dir/$job_name-<job id>.out"
fi
