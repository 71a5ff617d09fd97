#!/usr/bin/env bash
# Launch nested_decode on a Cloud TPU VM (single host or a multi-host pod slice).
# Run `launch/tpu.sh --help` for the flags.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage:
  launch/tpu.sh --name NAME --zone ZONE --accelerator-type TYPE --workdir gs://BUCKET/DIR \
                --config configs/FILE.py[:VARIANT] [options] [-- EXTRA_ARGS...]
  launch/tpu.sh --name NAME --zone ZONE [--queued] --delete

Creates the TPU VM (or reuses it when it already exists), copies this checkout to every
worker, installs it there and runs
  python -m nested_decode.main --config=CONFIG --workdir=WORKDIR EXTRA_ARGS...
on all workers at once. Output streams to this terminal and is also appended to
~/nested-decode-logs/run-<UTC time>.log on each worker. jax.distributed.initialize()
needs no arguments on TPU VMs, so nothing about the hosts is passed.

Required:
  --name NAME              TPU VM name (with --queued: queued-resource and node id).
  --zone ZONE              e.g. us-central2-b (v4), us-west4-a (v5e), us-east5-a (v6e).
  --accelerator-type TYPE  e.g. v4-32, v5litepod-16, v5p-16, v6e-16 (not with --delete).
  --workdir gs://...       Output directory; must be a Cloud Storage path, since every
                           host writes checkpoints and results to it (not with --delete).
  --config PATH[:VARIANT]  Config file inside this repository, e.g. configs/k600.py
                           (not with --delete).

Options:
  --version VERSION        TPU software (runtime) version. Default by accelerator type:
                             v2-*, v3-*, v4-*          tpu-ubuntu2204-base
                             v5litepod-*, v5e-*        v2-alpha-tpuv5-lite
                             v5p-*                     v2-alpha-tpuv5
                             v6e-*                     v2-alpha-tpuv6e
  --project PROJECT        Google Cloud project (default: gcloud's core/project).
  --queued                 Request the slice as a queued resource
                           (gcloud compute tpus queued-resources create) and wait until
                           it is ACTIVE, instead of gcloud compute tpus tpu-vm create.
  --spot                   Spot capacity (can be reclaimed at any time; the job resumes
                           from its last checkpoint when launched again).
  --preemptible            Preemptible capacity (tpu-vm create only; with --queued it
                           becomes --spot, the tier queued resources offer instead).
  --detach                 Start the job with nohup and return at once instead of
                           streaming its output; prints how to follow the log.
  --delete                 Delete the TPU VM (with --queued: the queued resource and its
                           node) and exit.
  --dry-run                Print each command, prefixed with "+ ", instead of running it
                           (gcloud is not needed then).
  -h, --help               Show this help.
  -- EXTRA_ARGS...         Passed to nested_decode.main unchanged, e.g.
                           -- --mode=train --config.train.batch_size=1024

Environment:
  TPU_PYTHON               Python used for the venv on the workers (default python3.11;
                           installed with apt when missing, as the Ubuntu 22.04 images
                           ship 3.10 and nested_decode needs >= 3.11).
  LIBTPU_FIND_LINKS        Extra pip -f URL for libtpu wheels; empty by default, as
                           jax[tpu] resolves libtpu from PyPI. For old jax versions use
                           https://storage.googleapis.com/jax-releases/libtpu_releases.html
  QUEUED_POLL_SECONDS      Seconds between state checks while waiting (default 30).
  QUEUED_TIMEOUT_SECONDS   Give up waiting for ACTIVE after this long (default 0: never).

On the workers: code in ~/nested-decode (replaced on every launch), venv in
~/nested-decode-venv (kept), logs in ~/nested-decode-logs.
EOF
}

LAUNCHER=tpu.sh
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

name='' zone='' accelerator_type='' version='' project='' workdir='' config=''
queued=0 spot=0 preemptible=0 delete=0 detach=0
extra_args=()

while (($#)); do
  case $1 in
    --) shift; extra_args=("$@"); break ;;
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
  esac
  case $1 in
    -h | --help) usage; exit 0 ;;
    --name) need_value "$@"; name=$2; shift ;;
    --zone) need_value "$@"; zone=$2; shift ;;
    --accelerator-type) need_value "$@"; accelerator_type=$2; shift ;;
    --version) need_value "$@"; version=$2; shift ;;
    --project) need_value "$@"; project=$2; shift ;;
    --workdir) need_value "$@"; workdir=$2; shift ;;
    --config) need_value "$@"; config=$2; shift ;;
    --queued) queued=1 ;;
    --spot) spot=1 ;;
    --preemptible) preemptible=1 ;;
    --delete) delete=1 ;;
    --detach) detach=1 ;;
    --dry-run) dry_run=1 ;;
    *) die "unknown argument '$1' (arguments for nested_decode.main go after --; see --help)" ;;
  esac
  shift
done

[[ -n $name ]] || die "--name is required (see --help)"
[[ -n $zone ]] || die "--zone is required (see --help)"
if ((spot && preemptible)); then
  die "--spot and --preemptible exclude each other"
fi

need_gcloud() {
  if ((!dry_run)) && ! command -v gcloud >/dev/null 2>&1; then
    die "gcloud not found on PATH (install the Google Cloud CLI, or use --dry-run)"
  fi
}

# Every gcloud call gets the project when one is given.
project_args=()
if [[ -n $project ]]; then
  project_args=("--project=$project")
fi
gc() {
  run gcloud "$@" ${project_args[@]+"${project_args[@]}"}
}

if ((delete)); then
  need_gcloud
  if ((queued)); then
    gc compute tpus queued-resources delete "$name" "--zone=$zone" --force --quiet
  else
    gc compute tpus tpu-vm delete "$name" "--zone=$zone" --quiet
  fi
  exit 0
fi

[[ -n $accelerator_type ]] || die "--accelerator-type is required, e.g. v5litepod-16 or v4-32 (see --help)"
[[ -n $workdir ]] || die "--workdir is required: a gs://BUCKET/DIR path (see --help)"
if [[ $workdir != gs://?* ]]; then
  die "--workdir must be a Cloud Storage path starting with gs:// (got '$workdir'): every TPU host writes checkpoints there, and a local path would be a different disk on each worker"
fi
[[ -n $config ]] || die "--config is required, e.g. configs/k600.py (see --help)"

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
config_file=${config%%:*}
if [[ $config_file == /* ]]; then
  die "--config must be relative to the repository root, e.g. configs/k600.py (got '$config')"
fi
[[ -f $repo/$config_file ]] || die "--config: no file '$config_file' in $repo"

if [[ -z $version ]]; then
  case $accelerator_type in
    v2-* | v3-* | v4-*) version=tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) version=v2-alpha-tpuv5-lite ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v6e-*) version=v2-alpha-tpuv6e ;;
    *) die "no default --version for accelerator type '$accelerator_type'; pass --version" ;;
  esac
fi

capacity_args=()
if ((spot)); then
  capacity_args=(--spot)
elif ((preemptible)); then
  if ((queued)); then
    note "queued resources have no preemptible tier; requesting --spot instead"
    capacity_args=(--spot)
  else
    capacity_args=(--preemptible)
  fi
fi

# Reads a resource's state; prints NOT_FOUND when it does not exist, dies on other errors.
describe_state() {  # KIND FORMAT
  local out err
  err=$(mktemp "${TMPDIR:-/tmp}/tpu-sh-err.XXXXXX")
  if out=$(gcloud compute tpus "$1" describe "$name" "--zone=$zone" "--format=$2" \
      ${project_args[@]+"${project_args[@]}"} 2>"$err"); then
    rm -f "$err"
    printf '%s\n' "${out:-UNKNOWN}"
  elif grep -qi 'not_found\|not found' "$err"; then
    rm -f "$err"
    echo NOT_FOUND
  else
    cat "$err" >&2
    rm -f "$err"
    die "could not describe $1 '$name' in $zone"
  fi
}

# Polls until the resource reaches READY/ACTIVE; dies on a state it cannot leave by itself.
queued_flag=''
if ((queued)); then queued_flag=' --queued'; fi
wait_for() {  # KIND FORMAT TARGET
  local poll=${QUEUED_POLL_SECONDS:-30} limit=${QUEUED_TIMEOUT_SECONDS:-0} start=$SECONDS state
  while :; do
    state=$(describe_state "$1" "$2")
    case $state in
      "$3") note "$1 '$name' is $3"; return 0 ;;
      FAILED | SUSPENDED | SUSPENDING | DELETING | PREEMPTED | TERMINATED | STOPPED | NOT_FOUND)
        die "$1 '$name' is $state; remove it with: launch/tpu.sh --name $name --zone $zone$queued_flag --delete" ;;
    esac
    if ((limit > 0 && SECONDS - start >= limit)); then
      die "$1 '$name' still $state after ${limit}s"
    fi
    note "$1 '$name' is $state; checking again in ${poll}s"
    sleep "$poll"
  done
}

need_gcloud

# 1. The TPU VM or queued resource: reuse it when it exists, create it otherwise.
if ((queued)); then
  kind=queued-resources format='value(state.state)' ready=ACTIVE
  create=(compute tpus queued-resources create "$name" "--node-id=$name" "--zone=$zone"
    "--accelerator-type=$accelerator_type" "--runtime-version=$version")
else
  kind=tpu-vm format='value(state)' ready=READY
  create=(compute tpus tpu-vm create "$name" "--zone=$zone"
    "--accelerator-type=$accelerator_type" "--version=$version")
fi
create+=(${capacity_args[@]+"${capacity_args[@]}"})

if ((dry_run)); then
  gc compute tpus "$kind" describe "$name" "--zone=$zone" "--format=$format"
  echo "# dry run: assuming '$name' does not exist yet"
  gc "${create[@]}"
  if ((queued)); then
    echo "# dry run: the describe above is repeated every ${QUEUED_POLL_SECONDS:-30}s until the state is ACTIVE"
  fi
else
  state=$(describe_state "$kind" "$format")
  if [[ $state == NOT_FOUND ]]; then
    note "creating $kind '$name' ($accelerator_type, $version)"
    gc "${create[@]}"
  else
    note "reusing $kind '$name' (state $state)"
  fi
  wait_for "$kind" "$format" "$ready"
fi

# 2. Copy this checkout (tracked and untracked files, minus what .gitignore excludes:
#    uncommitted edits included, runs/ and caches not) to every worker.
remote_dir=nested-decode        # relative to the home directory on each worker
remote_venv=nested-decode-venv
remote_logs=nested-decode-logs
remote_archive=$remote_dir.tar.gz
if ((dry_run)); then
  archive="${TMPDIR:-/tmp}/nested-decode.XXXXXX.tar.gz"
  if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    echo "+ git -C $(shquote "$repo") ls-files -z --cached --others --exclude-standard | tar -czf $(shquote "$archive") -C $(shquote "$repo") --null -T -"
  else
    echo "+ tar -czf $(shquote "$archive") -C $(shquote "$repo") --exclude=.git --exclude=runs --exclude=__pycache__ ."
  fi
else
  archive=$(mktemp "${TMPDIR:-/tmp}/nested-decode.XXXXXX")
  trap 'rm -f "$archive"' EXIT
  export COPYFILE_DISABLE=1  # no macOS ._* files in the archive
  if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$repo" && git ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' f; do
        if [[ -e $f ]]; then printf '%s\0' "$f"; fi  # skip deleted-but-tracked files
      done | tar -czf "$archive" --null -T -)
  else
    tar -czf "$archive" -C "$repo" --exclude=.git --exclude=runs --exclude=__pycache__ \
      --exclude='*.egg-info' .
  fi
fi
gc compute tpus tpu-vm scp "$archive" "$name:$remote_archive" "--zone=$zone" --worker=all --quiet

# 3. Install it on every worker, in a venv with Python >= 3.11.
py=${TPU_PYTHON:-python3.11}
q_py=$(printf %q "$py")
pip_args=(-e '.[tf]' 'jax[tpu]')
if [[ -n ${LIBTPU_FIND_LINKS:-} ]]; then
  pip_args+=(-f "$LIBTPU_FIND_LINKS")
fi
q_pip_args=$(printf ' %q' "${pip_args[@]}")
setup="set -eu -o pipefail"
setup+="; rm -rf $remote_dir && mkdir -p $remote_dir && tar -xzf $remote_archive -C $remote_dir && rm -f $remote_archive"
setup+="; if [ ! -x $remote_venv/bin/pip ]; then rm -rf $remote_venv"
setup+="; if ! $q_py -m venv $remote_venv >/dev/null 2>&1; then rm -rf $remote_venv"
setup+="; sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $q_py $q_py-venv"
setup+=" && $q_py -m venv $remote_venv; fi; fi"
setup+="; $remote_venv/bin/python -m pip install -q --upgrade pip"
setup+="; cd $remote_dir && ../$remote_venv/bin/python -m pip install -q$q_pip_args"
gc compute tpus tpu-vm ssh "$name" "--zone=$zone" --worker=all --quiet "--command=$setup"

# 4. Run the job on all workers at once.
log="../$remote_logs/run-$(date -u +%Y%m%d-%H%M%S).log"
main=(python -m nested_decode.main "--config=$config" "--workdir=$workdir"
  ${extra_args[@]+"${extra_args[@]}"})
q_main=$(printf '%q ' "${main[@]:1}")
q_main="../$remote_venv/bin/python ${q_main% }"
job="mkdir -p $remote_logs && cd $remote_dir && "
if ((detach)); then
  job+="PYTHONUNBUFFERED=1 nohup $q_main >$log 2>&1 </dev/null &"
else
  job="set -o pipefail; $job"
  job+="PYTHONUNBUFFERED=1 $q_main 2>&1 | tee -a $log"
fi
note "running on all workers of '$name': $(show "${main[@]}" | cut -c3-)"
gc compute tpus tpu-vm ssh "$name" "--zone=$zone" --worker=all --quiet "--command=$job"
if ((detach)); then
  follow=(gcloud compute tpus tpu-vm ssh "$name" "--zone=$zone" --worker=0
    "--command=tail -f ${log#../}" ${project_args[@]+"${project_args[@]}"})
  note "started in the background; follow worker 0 with: $(show "${follow[@]}" | cut -c3-)"
fi
