"""A real llama-server (Debian's llama.cpp-tools) for the tests, started as a subprocess on 127.0.0.1.

`scripts/setup` installs llama.cpp-tools into the root filesystem; in native mode (or when it could
not be installed) `llama-server` is missing and the tests that need it skip.

The fixture lives here rather than in conftest.py; a test module imports it:

    from tests import llama_server as _servers

    llama_server = _servers.llama_server
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
import ctypes
from dataclasses import dataclass
import json
from pathlib import Path
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest
import pytest_socket

LLAMA_SERVER = "llama-server"
STARTUP_DEADLINE_S = 60.0
# 1 s of audio through the tiny mmproj is 780 prompt tokens; 4096 leaves room for a few seconds.
CONTEXT = 4096

# Qwen2.5-Instruct's chat template (the one with the <tools> system block and <tool_call> turns).
# llama-server recognises it as a tool-calling template (chat_template_caps.supports_tools) and
# parses <tool_call> JSON out of the answer into OpenAI `tool_calls`.
QWEN25_TOOLS_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n\
You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments \
within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": \
<args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) \
or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


@dataclass(frozen=True)
class LlamaServer:
    """A running llama-server: its OpenAI base URL (``…/v1``), root URL and API key."""

    url: str
    root: str
    api_key: str
    port: int
    log: Path

    @property
    def headers(self) -> dict[str, str]:
        """The Authorization header for this server's key."""
        return {"Authorization": f"Bearer {self.api_key}"}


def llama_server_path() -> str | None:
    """Path of ``llama-server`` on PATH, if any."""
    return shutil.which(LLAMA_SERVER)


def require_llama_server() -> str:
    """Path of ``llama-server``, or skip the test with the reason."""
    path = llama_server_path()
    if path is None:
        pytest.skip(
            "llama-server is not on PATH: scripts/setup installs Debian's llama.cpp-tools only in the "
            "root-filesystem environment (its build needs glibc >= 2.43)"
        )
    return path


@contextmanager
def real_sockets() -> Iterator[None]:
    """Let a session fixture open sockets (pick a port, poll /health) while the HA harness blocks them.

    The same switch the ``socket_enabled`` fixture makes; 127.0.0.1 stays the only allowed host.
    """
    blocked = socket.socket is not pytest_socket._true_socket
    if blocked:
        pytest_socket.enable_socket()
    try:
        yield
    finally:
        if blocked:
            pytest_socket.disable_socket(allow_unix_socket=True)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGKILL the server when the test process dies, so that it never outlives the session."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError, AttributeError:
        pass


def _get(url: str, headers: dict[str, str] | None = None, timeout: float = 2.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as err:
        return int(err.code), err.read()


def _log_tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate the server and reap it (SIGKILL after 10 s)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextmanager
def run_llama_server(
    gguf: str | Path,
    *,
    mmproj: str | Path | None = None,
    chat_template_file: str | Path | None = None,
    extra_args: Sequence[str] = (),
    log_dir: Path,
    api_key: str | None = None,
    deadline_s: float = STARTUP_DEADLINE_S,
) -> Iterator[LlamaServer]:
    """Start llama-server on 127.0.0.1 with a free port and a random API key; yield it once
    ``GET /health`` says ok; kill it (and wait for it) on exit."""
    binary = require_llama_server()
    key = api_key or secrets.token_urlsafe(24)
    attempts = 3  # a free port may be taken between choosing it and the server binding it
    for attempt in range(attempts):
        with real_sockets():
            port = free_port()
        log = log_dir / f"llama-server-{port}.log"
        cmd = [
            binary,
            "-m",
            str(gguf),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--api-key",
            key,
            "-c",
            str(CONTEXT),
            "--parallel",
            "1",
            *(["--mmproj", str(mmproj)] if mmproj else []),
            *(["--chat-template-file", str(chat_template_file)] if chat_template_file else []),
            *extra_args,
        ]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
            )
        try:
            root = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + deadline_s
            healthy = False
            with real_sockets():
                while time.monotonic() < deadline and proc.poll() is None:
                    try:
                        status, body = _get(f"{root}/health")
                    except OSError:  # not listening yet
                        status, body = 0, b""
                    if status == 200 and json.loads(body or b"{}").get("status") == "ok":
                        healthy = True
                        break
                    time.sleep(0.1)
            if not healthy:
                if proc.poll() is not None and attempt + 1 < attempts and "bind" in _log_tail(log).lower():
                    continue  # lost the port race: try another port
                raise RuntimeError(
                    f"llama-server did not become healthy within {deadline_s:.0f} s "
                    f"(exit code {proc.poll()}): {' '.join(cmd)}\n{_log_tail(log)}"
                )
            yield LlamaServer(url=f"{root}/v1", root=root, api_key=key, port=port, log=log)
            return
        finally:
            stop(proc)
    raise RuntimeError("llama-server could not bind a port")  # pragma: no cover


@pytest.fixture(scope="session")
def llama_server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """A real llama-server with the tiny GGUF + the tiny mmproj (audio + vision), for the session.

    Yields its OpenAI base URL ``http://127.0.0.1:<port>/v1`` and its API key (``.url``, ``.api_key``).
    """
    require_llama_server()
    with run_llama_server(
        models_dir / "tiny.gguf", mmproj=models_dir / "mmproj.gguf", log_dir=tmp_path_factory.mktemp("llama-server")
    ) as server:
        yield server


@pytest.fixture(scope="session")
def llama_server_qwen_tools(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """The tiny GGUF (no mmproj) with Qwen2.5's tool-calling chat template instead of its own ChatML one."""
    require_llama_server()
    log_dir = tmp_path_factory.mktemp("llama-server-qwen")
    template = log_dir / "qwen2.5-tools.jinja"
    template.write_text(QWEN25_TOOLS_TEMPLATE)
    with run_llama_server(models_dir / "tiny.gguf", chat_template_file=template, log_dir=log_dir) as server:
        yield server
