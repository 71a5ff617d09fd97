# shellcheck shell=bash
# Shell helpers shared by launch/tpu.sh and launch/gpu.sh (sourced, not run).
# The sourcing script sets LAUNCHER (its name, for messages) before sourcing.

die() {
  printf '%s: error: %s\n' "$LAUNCHER" "$*" >&2
  exit 2
}

note() {
  printf '%s: %s\n' "$LAUNCHER" "$*" >&2
}

# Quote one word for display: bare when it is safe, single-quoted otherwise.
shquote() {
  case $1 in
    '' | *[!A-Za-z0-9_@%+=:,./-]*)
      printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"
      ;;
    *) printf '%s' "$1" ;;
  esac
}

# A command as one line of shell words.
join_words() {
  local line='' word
  for word in "$@"; do
    line+="${line:+ }$(shquote "$word")"
  done
  printf '%s' "$line"
}

# Print a command as one copy-pasteable line prefixed with "+ ".
show() {
  printf '+ %s\n' "$(join_words "$@")"
}

# Run a command, or with --dry-run (dry_run=1) only show it.
dry_run=0
run() {
  if ((dry_run)); then
    show "$@"
  else
    "$@"
  fi
}

need_value() {
  if [[ $# -lt 2 || -z ${2-} || ${2-} == --* ]]; then
    die "$1 needs a value (see --help)"
  fi
}
