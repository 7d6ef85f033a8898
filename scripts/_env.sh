# shellcheck shell=bash
# Shared helpers for scripts/setup, scripts/test, scripts/develop, scripts/lint, scripts/bench.
# Sourced, not executed.
#
# SARAi needs Python >= 3.14.2 (Home Assistant 2026.x).  When the host has one, the
# virtual environment is created with it.  Otherwise a Debian-unstable root filesystem
# (made with mmdebstrap) provides it, and every command runs inside it through
# `unshare --mount` + `chroot`, the checkout bind-mounted at the same absolute path.
# Everything lives outside the checkout, keyed by hashes of what built it.

set -euo pipefail

SARAI_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SARAI_CACHE="${SARAI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sarai-dev}"
SARAI_MIN_PY="3.14.2"
ROOTFS_PACKAGES="python3.14 python3.14-venv python3.14-dev build-essential cmake ca-certificates espeak-ng ffmpeg git"

log() { printf '[sarai] %s\n' "$*" >&2; }

_hash() { cat "$@" | sha256sum | cut -c1-12; }

# The requirement files that define the venv.
REQ_FILES=("$SARAI_ROOT/requirements.txt" "$SARAI_ROOT/requirements_test.txt")
REQ_HASH="$(_hash "${REQ_FILES[@]}" "$SARAI_ROOT/scripts/_env.sh")"

native_python() {
  # Print a python >= SARAI_MIN_PY found on PATH, if any.
  local cand
  for cand in python3.14 python3.15 python3.16 python3; do
    if command -v "$cand" >/dev/null 2>&1; then
      if "$cand" -c "import sys; sys.exit(0 if sys.version_info >= tuple(int(x) for x in '$SARAI_MIN_PY'.split('.')) else 1)" 2>/dev/null; then
        command -v "$cand"
        return 0
      fi
    fi
  done
  return 1
}

if [[ "${SARAI_FORCE_ROOTFS:-0}" != "1" ]] && NATIVE_PY="$(native_python)"; then
  SARAI_MODE=native
else
  SARAI_MODE=rootfs
  NATIVE_PY=""
fi

ROOTFS_HASH="$(printf '%s' "$ROOTFS_PACKAGES v1" | sha256sum | cut -c1-12)"
ROOTFS="$SARAI_CACHE/rootfs-$ROOTFS_HASH"
if [[ "$SARAI_MODE" == rootfs ]]; then
  # The venv lives inside the root filesystem so that its paths are the same in and out.
  VENV_IN="/opt/sarai/venv-$REQ_HASH"
  VENV_HOST="$ROOTFS$VENV_IN"
  PIP_CACHE_IN="/opt/sarai/pip-cache"
else
  VENV_IN="$SARAI_CACHE/venv-$REQ_HASH"
  VENV_HOST="$VENV_IN"
  PIP_CACHE_IN="$SARAI_CACHE/pip-cache"
fi

# A clean environment for everything that runs in the project environment: the host's pip
# settings point at host-only paths (find-links, constraints, certificates) and must not leak.
_clean_env() {
  local keep=(
    "PATH=$VENV_IN/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    "HOME=${SARAI_HOME_IN:-/root}"
    "LANG=C.UTF-8" "LC_ALL=C.UTF-8"
    "PYTHONUNBUFFERED=1" "PYTHONDONTWRITEBYTECODE=1"
    "PIP_CACHE_DIR=$PIP_CACHE_IN" "PIP_DISABLE_PIP_VERSION_CHECK=1" "PIP_DEFAULT_TIMEOUT=180"
    "PIP_CONFIG_FILE=/dev/null"
    "HF_HUB_OFFLINE=1" "TRANSFORMERS_OFFLINE=1" "HF_HUB_DISABLE_TELEMETRY=1"
    "TERM=${TERM:-dumb}" "CI=${CI:-}"
    "VIRTUAL_ENV=$VENV_IN"
    "SARAI_ROOT=$SARAI_ROOT"
  )
  local v
  for v in $(compgen -e); do
    case "$v" in
      SARAI_*|OPENBLAS_*|OMP_NUM_THREADS|CMAKE_ARGS|PYTEST_ADDOPTS) keep+=("$v=${!v}") ;;
    esac
  done
  printf '%s\0' "${keep[@]}"
}

# Run a command in the project environment (inside the root filesystem when needed).
# No mount survives the command: the mounts live in a private mount namespace.
in_env() {
  local envv=()
  mapfile -d '' envv < <(_clean_env)
  if [[ "$SARAI_MODE" == native ]]; then
    (cd "$SARAI_ROOT" && exec env -i "${envv[@]}" "$@")
    return
  fi
  local shared
  shared="$(cd "$SARAI_ROOT/.." && pwd)/shared"
  [[ -d "$shared" ]] || shared=""
  local cwd="${SARAI_CWD:-$SARAI_ROOT}"
  unshare --mount --propagation private -- /bin/bash -euo pipefail -c '
    root="$1"; checkout="$2"; shared="$3"; cwd="$4"; shift 4
    mount --rbind /proc "$root/proc"
    mount --rbind /dev "$root/dev"
    mount --rbind /sys "$root/sys"
    mkdir -p "$root$checkout"
    mount --bind "$checkout" "$root$checkout"
    if [[ -n "$shared" ]]; then mkdir -p "$root$shared"; mount --bind "$shared" "$root$shared"; fi
    cp -L /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
    exec chroot "$root" /usr/bin/env -C "$cwd" "$@"
  ' sarai-env "$ROOTFS" "$SARAI_ROOT" "$shared" "$cwd" env -i "${envv[@]}" "$@"
}
