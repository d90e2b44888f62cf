#!/usr/bin/env bash
# Data-parallel mae-pretrain on this machine: N ranks over c10d (Gloo on the CPU), as torchrun
# would start them.
#
#   scripts/launch_local.sh N CONFIG [mae-pretrain args...]
#   scripts/launch_local.sh 2 configs/demo.json --set output.dir=runs/demo2
#   scripts/launch_local.sh 2 configs/demo.json --set output.dir=runs/demo2 --resume
#
# Each rank gets RANK = LOCAL_RANK = 0..N-1, WORLD_SIZE = N, MASTER_ADDR = 127.0.0.1 and
# MASTER_PORT (a free port, or $MASTER_PORT when set), and `--threads $(( $(nproc) / N ))` (at
# least 1) unless the arguments hold --threads. The program is $MAE_PRETRAIN, else
# build/apps/mae-pretrain of this checkout, else mae-pretrain on PATH.
#
# Ctrl-C / SIGTERM are passed on once to every rank (the ranks then agree on a step, rank 0 writes
# a checkpoint, all exit 130 / 143); a second Ctrl-C is passed on too (exit at once). When one rank
# fails the others are given MAE_LAUNCH_GRACE_S seconds (default 60) to stop on their own (they do
# within distributed.timeout_s), then SIGTERM, and SIGKILL 10 s later. The exit status is rank 0's,
# or the first non-zero status of any rank when rank 0 succeeded or had to be stopped here (128 +
# signal for a killed rank).
set -u

# A shell started in the background by a script ignores SIGINT, and bash cannot trap a signal that
# was ignored when it started: run again with SIGINT at its default so the trap below works.
if [[ -n ${MAE_LAUNCH_SIGINT_RESET:-} ]]; then
  unset MAE_LAUNCH_SIGINT_RESET
elif env --default-signal=INT true 2>/dev/null; then
  export MAE_LAUNCH_SIGINT_RESET=1
  exec env --default-signal=INT bash "${BASH_SOURCE[0]}" "$@"
fi

usage() {
  echo "usage: $0 N CONFIG [mae-pretrain args...]   (N ranks on this machine)" >&2
  exit 2
}

[[ $# -ge 2 ]] || usage
nranks=$1
config=$2
shift 2
[[ $nranks =~ ^[1-9][0-9]*$ ]] || { echo "$0: N must be a positive whole number, not \"$nranks\"" >&2; exit 2; }
[[ -e $config ]] || { echo "$0: $config: no such config file" >&2; exit 2; }

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -n ${MAE_PRETRAIN:-} ]]; then
  bin=$MAE_PRETRAIN
elif [[ -x $root/build/apps/mae-pretrain ]]; then
  bin=$root/build/apps/mae-pretrain
elif command -v mae-pretrain >/dev/null 2>&1; then
  bin=$(command -v mae-pretrain)
else
  echo "$0: no mae-pretrain: set MAE_PRETRAIN, build $root/build/apps/mae-pretrain, or put it on PATH" >&2
  exit 2
fi
[[ -x $bin ]] || { echo "$0: $bin is not an executable program" >&2; exit 2; }

# A port nothing listens on: the kernel's choice through python3, else probing with bash's /dev/tcp.
free_port() {
  local p i
  if command -v python3 >/dev/null 2>&1 &&
    p=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null) &&
    [[ -n $p ]]; then
    echo "$p"
    return 0
  fi
  for ((i = 0; i < 200; i++)); do
    p=$((20000 + RANDOM % 40000))
    if ! (: <"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "$p"
      return 0
    fi
  done
  return 1
}

if [[ -n ${MASTER_PORT:-} ]]; then
  port=$MASTER_PORT
else
  port=$(free_port) || { echo "$0: found no free port; set MASTER_PORT" >&2; exit 2; }
fi

thread_args=()
user_threads=0
for a in "$@"; do
  [[ $a == --threads || $a == --threads=* ]] && user_threads=1
done
if [[ $user_threads == 0 ]]; then
  cores=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
  per_rank=$((cores / nranks))
  ((per_rank >= 1)) || per_rank=1
  thread_args=(--threads "$per_rank")
fi

# A file descriptor to wait on with `read -t` (a builtin: the loop below starts no foreground
# program, so this script stays the terminal's foreground process group).
exec {pause_fd}<> <(:)
# Job control puts every rank into its own process group: a Ctrl-C at the terminal then reaches
# this script only, which passes it on exactly once (twice would be the "exit at once" Ctrl-C).
set -m

pids=()
stopping=""
# shellcheck disable=SC2317  # called from the traps below
forward() {
  stopping=$1
  local pid
  for pid in "${pids[@]}"; do
    kill -s "$1" "$pid" 2>/dev/null
  done
}
trap 'forward INT' INT
trap 'forward TERM' TERM
trap 'forward TERM' HUP

for ((r = 0; r < nranks; r++)); do
  RANK=$r LOCAL_RANK=$r WORLD_SIZE=$nranks LOCAL_WORLD_SIZE=$nranks MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
    "$bin" --config "$config" "${thread_args[@]}" "$@" &
  pids+=("$!")
  # A signal that came while the ranks were being started reaches the later ones too.
  [[ -n $stopping ]] && kill -s "$stopping" "$!" 2>/dev/null
done

declare -a status
left=$nranks
first_failure=""
grace=${MAE_LAUNCH_GRACE_S:-60}
[[ $grace =~ ^[0-9]+$ ]] || grace=60
fail_time=""
termed=""
while ((left > 0)); do
  for ((r = 0; r < nranks; r++)); do
    [[ -n ${status[r]:-} ]] && continue
    if ! kill -0 "${pids[r]}" 2>/dev/null; then
      wait "${pids[r]}"
      status[r]=$?
      left=$((left - 1))
      if [[ ${status[r]} != 0 && -z $first_failure ]]; then
        first_failure=${status[r]}
        [[ -z $stopping ]] && fail_time=$SECONDS
      fi
    fi
  done
  ((left > 0)) || break
  if [[ -n $fail_time ]]; then
    if [[ -z $termed ]] && ((SECONDS - fail_time >= grace)); then
      echo "$0: a rank failed ${grace} s ago; stopping the $left rank(s) left with SIGTERM" >&2
      termed=$SECONDS
      for ((r = 0; r < nranks; r++)); do
        [[ -z ${status[r]:-} ]] && kill -s TERM "${pids[r]}" 2>/dev/null
      done
    elif [[ -n $termed ]] && ((SECONDS - termed >= 10)); then
      echo "$0: killing the $left rank(s) left" >&2
      for ((r = 0; r < nranks; r++)); do
        [[ -z ${status[r]:-} ]] && kill -s KILL "${pids[r]}" 2>/dev/null
      done
      termed=$((SECONDS + 1000000))
    fi
  fi
  read -r -t 0.2 -u "$pause_fd" _
done

# Rank 0's status, unless it succeeded or was stopped here after another rank had failed.
if [[ ${status[0]} != 0 && -z $termed ]]; then
  exit "${status[0]}"
fi
exit "${first_failure:-0}"
