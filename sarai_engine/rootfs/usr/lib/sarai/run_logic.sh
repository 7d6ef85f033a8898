# shellcheck shell=bash
# SARAi Engine app (add-on): its start-up logic, as plain bash functions.
#
# Sourced by the s6 service scripts (run by bashio) and by the tests (plain bash, no bashio): the few
# bashio functions used are called only when bashio is loaded, with plain fallbacks otherwise. Options
# are read from /data/options.json with the engine's Python, so the same code runs in both.
#
#   sarai_main      validate the options, then exec the server (SARAI_DRY_RUN: write its command line)
#   sarai_announce  wait until the server answers, then send the discovery message to the Supervisor
#
# Settings from the environment (defaults are the app's own; the tests change them):
#   SARAI_OPTIONS        the options file                              /data/options.json
#   SARAI_DATA           the app's persistent folder                   /data
#   SARAI_MODEL_ROOTS    folders a model may live in                   "/share /media"
#   SARAI_PYTHON         the engine's Python                           /opt/sarai/venv/bin/python3
#   SARAI_PYTHONPATH     where the `engine` package is                 /opt/sarai
#   SARAI_PORT           the port inside the container                 8091
#   SARAI_HOSTNAME       the name Home Assistant reaches the app by    $HOSTNAME
#   SARAI_HOST_PORT      without bashio: the host port 8091/tcp is published on ("" = not published)
#   SARAI_SUPERVISOR     without bashio: the Supervisor API            http://supervisor
#   SARAI_READY_TIMEOUT  seconds sarai_announce waits for the server  900
#   SARAI_DRY_RUN        a folder: write `command` (one argument a line), `environment` (the API key's
#                        variable) and `discovery.json` there instead of starting the server and
#                        sending the discovery message

SARAI_OPTIONS="${SARAI_OPTIONS:-/data/options.json}"
SARAI_DATA="${SARAI_DATA:-/data}"
SARAI_MODEL_ROOTS="${SARAI_MODEL_ROOTS:-/share /media}"
SARAI_PYTHON="${SARAI_PYTHON:-/opt/sarai/venv/bin/python3}"
SARAI_PYTHONPATH="${SARAI_PYTHONPATH:-/opt/sarai}"
SARAI_PORT="${SARAI_PORT:-8091}"
SARAI_SUPERVISOR="${SARAI_SUPERVISOR:-http://supervisor}"
SARAI_READY_TIMEOUT="${SARAI_READY_TIMEOUT:-900}"
SARAI_SERVICE="sarai"

# -- logging ------------------------------------------------------------------------------------------

sarai_log() {
  local level="$1"
  shift
  if declare -F "bashio::log.${level}" >/dev/null; then
    "bashio::log.${level}" "$*"
  else
    printf '[sarai_engine] %s: %s\n' "${level^^}" "$*" >&2
  fi
}

sarai_fatal() {
  sarai_log error "$*"
  exit 1
}

# -- options ------------------------------------------------------------------------------------------

# Sets SARAI_ENGINE, SARAI_GGUF, SARAI_MMPROJ, SARAI_OMNI, SARAI_BUDGET, SARAI_CTX, SARAI_THREADS and
# SARAI_OPT_API_KEY from the options file ("" for an option that is missing or null).
sarai_load_options() {
  local assignments
  assignments="$(
    "${SARAI_PYTHON}" - "${SARAI_OPTIONS}" <<'PY'
import json
import shlex
import sys

try:
    with open(sys.argv[1], encoding="utf-8") as f:
        options = json.load(f)
except (OSError, ValueError) as err:
    sys.exit(f"cannot read {sys.argv[1]}: {err}")
if not isinstance(options, dict):
    sys.exit(f"{sys.argv[1]} is not a JSON object")
names = {
    "engine": "SARAI_ENGINE",
    "gguf_model": "SARAI_GGUF",
    "mmproj_model": "SARAI_MMPROJ",
    "omni_model": "SARAI_OMNI",
    "memory_budget_mb": "SARAI_BUDGET",
    "context_size": "SARAI_CTX",
    "threads": "SARAI_THREADS",
    "api_key": "SARAI_OPT_API_KEY",
}
defaults = {"engine": "sarai", "memory_budget_mb": 12000, "context_size": 8192, "threads": 0}
for key, var in names.items():
    value = options.get(key)
    if value is None:
        value = defaults.get(key, "")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        sys.exit(f"option {key} has an invalid value")
    value = str(value)
    if key != "api_key":
        value = value.strip()
    print(f"{var}={shlex.quote(value)}")
PY
  )" || sarai_fatal "cannot read the app options (${SARAI_OPTIONS})"
  eval "${assignments}"
}

_sarai_has_control() {
  [[ "$1" =~ [[:cntrl:]] ]]
}

_sarai_integer() { # _sarai_integer NAME VALUE MIN MAX
  local name="$1" value="$2" min="$3" max="$4"
  if ! [[ "${value}" =~ ^[0-9]+$ ]] || ((10#${value} < min || 10#${value} > max)); then
    sarai_fatal "${name} must be a whole number from ${min} to ${max} (got '${value}')"
  fi
}

# A model path: absolute, inside one of SARAI_MODEL_ROOTS once resolved (no way out with .. or a link),
# there, readable; a GGUF file starts with "GGUF", an Omni checkpoint folder has a config.json.
_sarai_check_model() { # _sarai_check_model OPTION PATH gguf|dir
  local option="$1" path="$2" kind="$3" resolved root inside=""
  local -a roots
  read -r -a roots <<<"${SARAI_MODEL_ROOTS}"
  if _sarai_has_control "${path}" || [[ "${path}" != /* ]]; then
    sarai_fatal "${option} must be an absolute path under ${SARAI_MODEL_ROOTS// / or } (got '${path}')"
  fi
  resolved="$(realpath -m -- "${path}")"
  for root in "${roots[@]}"; do
    root="$(realpath -m -- "${root}")"
    if [[ "${resolved}" == "${root}/"* ]]; then
      inside=1
    fi
  done
  if [[ -z "${inside}" ]]; then
    sarai_fatal "${option} must be inside ${SARAI_MODEL_ROOTS// / or }, the folders this app can read (got '${path}')"
  fi
  if [[ "${kind}" == dir ]]; then
    [[ -d "${resolved}" ]] || sarai_fatal "${option}: no such folder: ${path}"
    [[ -f "${resolved}/config.json" && -r "${resolved}/config.json" ]] ||
      sarai_fatal "${option}: ${path} is not a Qwen2.5-Omni checkpoint (no config.json in it)"
  else
    [[ -f "${resolved}" ]] || sarai_fatal "${option}: no such file: ${path}"
    [[ -r "${resolved}" ]] || sarai_fatal "${option}: cannot read ${path}"
    [[ "$(head -c 4 -- "${resolved}" 2>/dev/null)" == GGUF ]] || sarai_fatal "${option}: ${path} is not a GGUF file"
  fi
}

sarai_validate() {
  case "${SARAI_ENGINE}" in
    sarai | llama_server) ;;
    *) sarai_fatal "engine must be 'sarai' or 'llama_server' (got '${SARAI_ENGINE}')" ;;
  esac
  [[ -n "${SARAI_GGUF}" ]] ||
    sarai_fatal "gguf_model is not set: copy the Qwen2.5-Omni GGUF under /share or /media and enter its path"
  _sarai_check_model gguf_model "${SARAI_GGUF}" gguf
  if [[ -n "${SARAI_MMPROJ}" ]]; then
    _sarai_check_model mmproj_model "${SARAI_MMPROJ}" gguf
  fi
  if [[ -n "${SARAI_OMNI}" ]]; then
    _sarai_check_model omni_model "${SARAI_OMNI}" dir
  fi
  _sarai_integer memory_budget_mb "${SARAI_BUDGET}" 1024 1048576
  _sarai_integer context_size "${SARAI_CTX}" 512 131072
  _sarai_integer threads "${SARAI_THREADS}" 0 256
  if [[ "${SARAI_ENGINE}" == llama_server ]]; then
    command -v llama-server >/dev/null ||
      sarai_fatal "engine llama_server: this build of the app has no llama-server (build argument WITH_LLAMA_SERVER=false)"
    if [[ -n "${SARAI_OMNI}" ]]; then
      sarai_log warning "omni_model is ignored with engine llama_server (no speech output, no time-aligned video)"
    fi
  elif [[ -n "${SARAI_OMNI}" ]]; then
    "${SARAI_PYTHON}" -c 'import importlib.util as u, sys; sys.exit(not (u.find_spec("torch") and u.find_spec("transformers")))' ||
      sarai_fatal "omni_model needs PyTorch and transformers, which this build of the app leaves out (build argument WITH_OMNI=true)"
  fi
}

# -- API key ------------------------------------------------------------------------------------------

# The host port 8091/tcp is published on ("" when it is not).
sarai_host_port() {
  local port=""
  if declare -F bashio::app.port >/dev/null; then
    port="$(bashio::app.port "${SARAI_PORT}/tcp")"
  elif declare -F bashio::addon.port >/dev/null; then
    port="$(bashio::addon.port "${SARAI_PORT}/tcp")"
  else
    port="${SARAI_HOST_PORT:-}"
  fi
  [[ "${port}" == null ]] && port=""
  printf '%s' "${port}"
}

# Sets SARAI_KEY: the api_key option; without one, a random key kept in /data (Home Assistant gets it
# by discovery), unless the port is published on the host: then the app refuses to start.
# `sarai_resolve_api_key wait` (the discovery) waits for the engine's start to write that key instead.
sarai_resolve_api_key() {
  local host_port file="${SARAI_DATA}/api_key" waited=0
  if [[ -n "${SARAI_OPT_API_KEY}" ]]; then
    if _sarai_has_control "${SARAI_OPT_API_KEY}" || [[ "${SARAI_OPT_API_KEY}" =~ [[:space:]] ]]; then
      sarai_fatal "api_key must not contain spaces or control characters (it is sent in an HTTP header)"
    fi
    if ((${#SARAI_OPT_API_KEY} < 16)); then
      sarai_log warning "api_key is shorter than 16 characters: use a long random key"
    fi
    SARAI_KEY="${SARAI_OPT_API_KEY}"
    return 0
  fi
  host_port="$(sarai_host_port)"
  if [[ -n "${host_port}" ]]; then
    sarai_fatal "api_key is required: port ${SARAI_PORT}/tcp is published on the host (port ${host_port}), so anything on your network could use the engine. Set api_key, or disable the port in the Network section"
  fi
  if [[ "${1:-}" == wait ]]; then
    while [[ ! -s "${file}" ]]; do
      if ((waited >= 2 * SARAI_READY_TIMEOUT)); then
        sarai_log error "No API key in ${file} after ${SARAI_READY_TIMEOUT} s: the engine did not start"
        return 1
      fi
      sleep 0.5
      waited=$((waited + 1))
    done
  elif [[ ! -s "${file}" ]]; then
    (umask 077 && "${SARAI_PYTHON}" -c 'import secrets; print(secrets.token_urlsafe(32))' >"${file}.tmp") &&
      mv -f "${file}.tmp" "${file}" || sarai_fatal "cannot write ${file}"
    sarai_log info "Generated an API key for Home Assistant (sent by discovery, kept in /data)"
  fi
  SARAI_KEY="$(<"${file}")"
}

# -- server -------------------------------------------------------------------------------------------

# Fills the array SARAI_CMD with the server's command line, and SARAI_KEY_ENV with the name of the
# environment variable that carries the API key to it (never on the command line).
sarai_command() {
  SARAI_CMD=()
  if [[ "${SARAI_ENGINE}" == llama_server ]]; then
    SARAI_KEY_ENV=LLAMA_API_KEY
    SARAI_CMD=(llama-server -m "${SARAI_GGUF}")
    [[ -n "${SARAI_MMPROJ}" ]] && SARAI_CMD+=(--mmproj "${SARAI_MMPROJ}")
    SARAI_CMD+=(--host 0.0.0.0 --port "${SARAI_PORT}" -c "${SARAI_CTX}" --parallel 1)
    ((10#${SARAI_THREADS} > 0)) && SARAI_CMD+=(--threads "${SARAI_THREADS}")
  else
    SARAI_KEY_ENV=SARAI_API_KEY
    SARAI_CMD=("${SARAI_PYTHON}" -m engine.server --gguf "${SARAI_GGUF}")
    [[ -n "${SARAI_MMPROJ}" ]] && SARAI_CMD+=(--mmproj "${SARAI_MMPROJ}")
    [[ -n "${SARAI_OMNI}" ]] && SARAI_CMD+=(--omni "${SARAI_OMNI}")
    SARAI_CMD+=(--budget-mb "${SARAI_BUDGET}" --ctx "${SARAI_CTX}")
    ((10#${SARAI_THREADS} > 0)) && SARAI_CMD+=(--threads "${SARAI_THREADS}")
    SARAI_CMD+=(--host 0.0.0.0 --port "${SARAI_PORT}")
  fi
  return 0
}

sarai_main() {
  sarai_load_options
  sarai_validate
  sarai_resolve_api_key
  sarai_command
  sarai_log info "Starting the ${SARAI_ENGINE} engine on port ${SARAI_PORT}: ${SARAI_GGUF}${SARAI_MMPROJ:+ + ${SARAI_MMPROJ}}${SARAI_OMNI:+ + ${SARAI_OMNI}}"
  if [[ -n "${SARAI_DRY_RUN:-}" ]]; then
    printf '%s\n' "${SARAI_CMD[@]}" >"${SARAI_DRY_RUN}/command"
    printf '%s=%s\n' "${SARAI_KEY_ENV}" "${SARAI_KEY}" >"${SARAI_DRY_RUN}/environment"
    return 0
  fi
  export "${SARAI_KEY_ENV}=${SARAI_KEY}"
  export PYTHONPATH="${SARAI_PYTHONPATH}${PYTHONPATH:+:${PYTHONPATH}}"
  exec "${SARAI_CMD[@]}"
}

# -- discovery ----------------------------------------------------------------------------------------

# The discovery message's config: {"host", "port", "api_key", "engine"}.
sarai_discovery_payload() {
  "${SARAI_PYTHON}" -c 'import json, sys; print(json.dumps({"host": sys.argv[1], "port": int(sys.argv[2]), "api_key": sys.argv[3], "engine": sys.argv[4]}))' \
    "${SARAI_HOSTNAME:-${HOSTNAME:-$(cat /etc/hostname)}}" "${SARAI_PORT}" "${SARAI_KEY}" "${SARAI_ENGINE}"
}

# Waits until GET /v1/models answers 200 with the key (both engines serve it); 1 after the timeout.
sarai_wait_ready() {
  "${SARAI_PYTHON}" - "http://127.0.0.1:${SARAI_PORT}/v1/models" "${SARAI_KEY}" "${SARAI_READY_TIMEOUT}" <<'PY'
import sys
import time
import urllib.error
import urllib.request

url, key, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
deadline = time.monotonic() + timeout
request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            if resp.status == 200:
                sys.exit(0)
    except (OSError, urllib.error.URLError):
        pass
    time.sleep(0.5)
sys.exit(1)
PY
}

# Without bashio: POST {"service": "sarai", "config": ...} to the Supervisor's /discovery.
_sarai_post_discovery() {
  "${SARAI_PYTHON}" - "${SARAI_SUPERVISOR}/discovery" "${SARAI_SERVICE}" "$1" <<'PY'
import json
import os
import sys
import urllib.request

url, service, config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
body = json.dumps({"service": service, "config": config}).encode()
headers = {"Content-Type": "application/json", "Authorization": f"Bearer {os.environ.get('SUPERVISOR_TOKEN', '')}"}
with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers, method="POST"), timeout=30) as r:
    sys.exit(0 if r.status == 200 else 1)
PY
}

sarai_announce() {
  local payload
  sarai_load_options
  sarai_resolve_api_key wait || return 1
  if ! sarai_wait_ready; then
    sarai_log error "The engine did not answer on port ${SARAI_PORT} within ${SARAI_READY_TIMEOUT} s: discovery not sent"
    return 1
  fi
  payload="$(sarai_discovery_payload)" || return 1
  if [[ -n "${SARAI_DRY_RUN:-}" ]]; then
    printf '%s\n' "${payload}" >"${SARAI_DRY_RUN}/discovery.json"
    return 0
  fi
  if declare -F bashio::discovery >/dev/null; then
    bashio::discovery "${SARAI_SERVICE}" "${payload}" >/dev/null || {
      sarai_log error "Discovery message to Home Assistant failed"
      return 1
    }
  else
    _sarai_post_discovery "${payload}" || {
      sarai_log error "Discovery message to Home Assistant failed"
      return 1
    }
  fi
  sarai_log info "Sent the discovery information to Home Assistant"
}
