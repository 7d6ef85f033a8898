"""The SARAi Engine app (add-on) in sarai_engine/: its configuration against the Supervisor's documented
keys, and its start-up logic (rootfs/usr/lib/sarai/run_logic.sh) run by bash without bashio.

Docker is not needed: the run logic's dry-run mode writes the server's command line and the discovery
message to files; the end-to-end tests start the real servers (llama-server, SARAi's engine server) through
it on 127.0.0.1 and kill them at the end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
import json
import os
from pathlib import Path
import re
import shutil
import stat
import subprocess
import sys
from typing import Any
import urllib.error
import urllib.request

from aiohttp import web
import pytest
import yaml

from custom_components.sarai.const import DOMAIN
from tests import llama_server as _servers
from tests.common import local_server
from tests.llama_server import LlamaServer, free_port, real_sockets, require_llama_server

llama_server = _servers.llama_server  # the fixture

ROOT = Path(__file__).resolve().parents[1]
ADDON = ROOT / "sarai_engine"
RUN_LOGIC = ADDON / "rootfs/usr/lib/sarai/run_logic.sh"
S6 = ADDON / "rootfs/etc/s6-overlay/s6-rc.d"
KEY = "k" * 32
HOSTNAME = "a0d7b954-sarai-engine"

# developers.home-assistant.io/docs/apps/configuration (checked 2026-11-28): required and optional keys.
CONFIG_REQUIRED = {"name", "version", "slug", "description", "arch"}
CONFIG_OPTIONAL = {
    "machine", "url", "startup", "webui", "boot", "ports", "ports_description", "host_network", "host_ipc",
    "host_dbus", "host_pid", "host_uts", "devices", "homeassistant", "hassio_role", "hassio_api",
    "homeassistant_api", "docker_api", "privileged", "full_access", "apparmor", "map", "environment", "audio",
    "video", "gpio", "usb", "uart", "udev", "devicetree", "kernel_modules", "stdin", "legacy", "options",
    "schema", "image", "timeout", "tmpfs", "discovery", "services", "auth_api", "ingress", "ingress_port",
    "ingress_entry", "ingress_stream", "panel_icon", "panel_title", "panel_admin", "backup", "backup_pre",
    "backup_post", "backup_exclude", "stage", "init", "watchdog", "realtime", "journald", "breaking_versions",
    "ulimits",
}  # fmt: skip
ARCHES = {"aarch64", "amd64"}
MAP_TYPES = {
    "homeassistant_config", "addon_config", "ssl", "addons", "backup", "share", "media", "all_addon_configs",
    "data",
}  # fmt: skip
# The Supervisor's option schema elements (supervisor/apps/options.py, RE_SCHEMA_ELEMENT).
RE_SCHEMA_ELEMENT = re.compile(
    r"^(?:"
    r"|bool|email|url|port"
    r"|device(?:\((?P<filter>subsystem=[a-z]+)\))?"
    r"|str(?:\((?P<s_min>\d+)?,(?P<s_max>\d+)?\))?"
    r"|password(?:\((?P<p_min>\d+)?,(?P<p_max>\d+)?\))?"
    r"|int(?:\((?P<i_min>-?\d+)?,(?P<i_max>-?\d+)?\))?"
    r"|float(?:\((?P<f_min>-?\d*\.?\d+)?,(?P<f_max>-?\d*\.?\d+)?\))?"
    r"|match\((?P<match>.*)\)"
    r"|list\((?P<list>.+)\)"
    r")\??$"
)
RE_SERVICE = re.compile(r"^(?P<service>mqtt|mysql):(?P<rights>provide|want|need)$")  # `services`: only these


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.split("[")[0].lower()] = version
    return pins


# -- config.yaml, translations, build files ------------------------------------------------------------


def test_config_keys_are_documented() -> None:
    """Only the Supervisor's documented keys, the required ones present, values of the documented forms."""
    config = _yaml(ADDON / "config.yaml")
    assert CONFIG_REQUIRED <= set(config), CONFIG_REQUIRED - set(config)
    assert set(config) <= CONFIG_REQUIRED | CONFIG_OPTIONAL, set(config) - CONFIG_REQUIRED - CONFIG_OPTIONAL
    assert config["slug"] == "sarai_engine" == ADDON.name
    assert re.fullmatch(r"[-_.A-Za-z0-9]+", config["slug"])
    assert isinstance(config["version"], str) and re.fullmatch(r"\d+\.\d+\.\d+", config["version"])
    assert set(config["arch"]) == ARCHES
    assert config["init"] is False  # s6-overlay v3 base image
    assert config["discovery"] == [DOMAIN]
    assert all(RE_SERVICE.match(s) for s in config.get("services", []))
    for volume in config["map"]:  # the current syntax: {type, read_only, path}
        assert set(volume) <= {"type", "read_only", "path"} and volume["type"] in MAP_TYPES
        assert volume["read_only"] is True
    assert {v["type"] for v in config["map"]} == {"share", "media"}
    assert config["ports"] == {"8091/tcp": None}  # not published unless the user asks
    assert set(config["ports_description"]) == set(config["ports"])
    assert all(re.fullmatch(r"\d+/(tcp|udp)", p) for p in config["ports"])
    assert config["watchdog"] == "tcp://[HOST]:[PORT:8091]"


def test_options_and_schema() -> None:
    """Every option has a schema entry; a schema entry without a default is optional ('?') or required on purpose."""
    config = _yaml(ADDON / "config.yaml")
    options, schema = config["options"], config["schema"]
    assert set(options) <= set(schema)
    for key, element in schema.items():
        assert isinstance(element, str) and RE_SCHEMA_ELEMENT.match(element), (key, element)
        assert key in options or element.endswith("?"), f"{key} has no default and is not optional"
    assert set(schema) == {
        "engine", "gguf_model", "mmproj_model", "omni_model", "memory_budget_mb", "context_size", "threads",
        "api_key",
    }  # fmt: skip
    assert schema["api_key"] == "password?"
    assert schema["engine"] == "list(sarai|llama_server)" and options["engine"] == "sarai"
    assert options["gguf_model"].startswith("/share/")


@pytest.mark.parametrize("language", ["en", "es"])
def test_translations_cover_every_option(language: str) -> None:
    """translations/<lang>.yaml names and describes every option and the port."""
    config = _yaml(ADDON / "config.yaml")
    translations = _yaml(ADDON / "translations" / f"{language}.yaml")
    assert set(translations) <= {"configuration", "network"}
    assert set(translations["configuration"]) == set(config["schema"])
    for key, entry in translations["configuration"].items():
        assert set(entry) == {"name", "description"}, key
        assert entry["name"].strip() and entry["description"].strip(), key
    assert set(translations["network"]) == set(config["ports"])


def test_docs_build_and_repository_files() -> None:
    """DOCS.md covers the options; the Dockerfile builds this version; pins match the integration's; one repo."""
    config = _yaml(ADDON / "config.yaml")
    docs = (ADDON / "DOCS.md").read_text()
    for key in config["schema"]:
        assert f"`{key}`" in docs, key
    assert f"## {config['version']}" in (ADDON / "CHANGELOG.md").read_text()
    dockerfile = (ADDON / "Dockerfile").read_text()
    instructions = [line for line in dockerfile.splitlines() if line and not line.startswith("#")]
    assert instructions[0] == "ARG BUILD_FROM=ghcr.io/home-assistant/base-debian:trixie"
    assert f"ARG SARAI_VERSION={config['version']}" in dockerfile
    assert "COPY --from=sarai-src /custom_components/sarai/engine /opt/sarai/engine" in dockerfile
    build = _yaml(ADDON / "build.yaml")
    assert set(build) == {"build_from"} and set(build["build_from"]) == set(config["arch"])
    assert all(image.endswith("-base-debian:trixie") for image in build["build_from"].values())
    # The app's packages are the integration's, at the same versions.
    project, test_pins = _pins(ROOT / "requirements.txt"), _pins(ROOT / "requirements_test.txt")
    app = _pins(ADDON / "requirements.txt")
    assert {k: app.get(k) for k in project} == project
    assert f"ARG LLAMA_CPP_PYTHON_VERSION={project['llama-cpp-python']}" in dockerfile
    for extra in ("requirements_torch.txt", "requirements_omni.txt"):
        pins = _pins(ADDON / extra)
        assert pins and pins == {k: test_pins[k] for k in pins}, extra
    # repository.yaml at the root; the Supervisor searches the whole repository for config.yaml files.
    repository = _yaml(ROOT / "repository.yaml")
    assert repository["name"] and set(repository) <= {"name", "url", "maintainer"}
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    app_configs = [f for f in files if Path(f).name in ("config.yaml", "config.yml", "config.json")]
    assert app_configs == ["sarai_engine/config.yaml"]
    icon = (ADDON / "icon.png").read_bytes()
    assert icon[:8] == b"\x89PNG\r\n\x1a\n" and icon[16:20] == icon[20:24]  # square


def test_s6_services() -> None:
    """The engine is an s6 longrun, the discovery a oneshot after it; every script parses."""
    assert (S6 / "sarai-engine/type").read_text().strip() == "longrun"
    assert (S6 / "discovery/type").read_text().strip() == "oneshot"
    assert (S6 / "discovery/up").read_text().strip() == "/etc/s6-overlay/s6-rc.d/discovery/run"
    assert (S6 / "sarai-engine/dependencies.d/base").exists()
    assert (S6 / "discovery/dependencies.d/sarai-engine").exists()
    assert {p.name for p in (S6 / "user/contents.d").iterdir()} == {"sarai-engine", "discovery"}
    for script in (S6 / "sarai-engine/run", S6 / "sarai-engine/finish", S6 / "discovery/run"):
        text = script.read_text()
        assert text.startswith("#!/command/with-contenv bashio\n"), script
        assert script.stat().st_mode & stat.S_IXUSR, f"{script} is not executable"
        subprocess.run(["bash", "-n", str(script)], check=True)
    assert "sarai_main" in (S6 / "sarai-engine/run").read_text()
    assert "sarai_announce" in (S6 / "discovery/run").read_text()
    subprocess.run(["bash", "-n", str(RUN_LOGIC)], check=True)


# -- run_logic.sh -----------------------------------------------------------------------------------------


class App:
    """A fake app filesystem: /share and /media stand-ins, /data, options.json, and the dry-run folder."""

    def __init__(self, root: Path) -> None:
        self.share = root / "share"
        self.media = root / "media"
        self.data = root / "data"
        self.out = root / "out"
        for d in (self.share, self.media, self.data, self.out):
            d.mkdir(parents=True)
        self.options_file = root / "options.json"
        self.gguf = self.share / "sarai" / "text.gguf"
        self.mmproj = self.media / "mmproj.gguf"
        self.omni = self.share / "omni"
        self.gguf.parent.mkdir()
        self.gguf.write_bytes(b"GGUF" + bytes(60))
        self.mmproj.write_bytes(b"GGUF" + bytes(60))
        self.omni.mkdir()
        (self.omni / "config.json").write_text("{}")

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "PATH": os.environ["PATH"],
            "LANG": "C.UTF-8",
            "SARAI_OPTIONS": str(self.options_file),
            "SARAI_DATA": str(self.data),
            "SARAI_MODEL_ROOTS": f"{self.share} {self.media}",
            "SARAI_PYTHON": sys.executable,
            "SARAI_HOSTNAME": HOSTNAME,
            "SARAI_DRY_RUN": str(self.out),
            **extra,
        }

    def options(self, **values: Any) -> dict[str, Any]:
        options = {
            "engine": "sarai",
            "gguf_model": str(self.gguf),
            "memory_budget_mb": 12000,
            "context_size": 8192,
            "threads": 0,
            **values,
        }
        self.options_file.write_text(json.dumps(options))
        return options

    def run(self, function: str = "sarai_main", prelude: str = "", **env: str) -> subprocess.CompletedProcess[str]:
        # bashio turns on errexit, nounset and pipefail: the logic must hold under them.
        script = f"set -euo pipefail\n{prelude}\nsource {RUN_LOGIC}\n{function}\n"
        return subprocess.run(
            ["bash", "-c", script], env=self.env(**env), capture_output=True, text=True, timeout=120, check=False
        )

    def command(self) -> list[str]:
        return (self.out / "command").read_text().splitlines()

    def environment(self) -> str:
        return (self.out / "environment").read_text()


@pytest.fixture
def app(tmp_path: Path) -> App:
    return App(tmp_path)


def test_command_line_sarai_engine(app: App) -> None:
    """options.json -> the engine server's exact command line; the key goes in SARAI_API_KEY, not argv."""
    app.options(mmproj_model=str(app.mmproj), omni_model=str(app.omni), threads=4, api_key=KEY)
    result = app.run()
    assert result.returncode == 0, result.stderr
    assert app.command() == [
        sys.executable, "-m", "engine.server",
        "--gguf", str(app.gguf),
        "--mmproj", str(app.mmproj),
        "--omni", str(app.omni),
        "--budget-mb", "12000",
        "--ctx", "8192",
        "--threads", "4",
        "--host", "0.0.0.0",
        "--port", "8091",
    ]  # fmt: skip
    assert app.environment() == f"SARAI_API_KEY={KEY}\n"
    assert KEY not in result.stderr
    assert "Starting the sarai engine on port 8091" in result.stderr


def test_command_line_minimal_and_llama_server(app: App) -> None:
    """No mmproj / Omni / threads: no flags for them; engine llama_server: its own flags, Omni ignored."""
    app.options(api_key=KEY, mmproj_model=None, context_size=4096)
    assert app.run().returncode == 0
    assert app.command() == [
        sys.executable, "-m", "engine.server", "--gguf", str(app.gguf), "--budget-mb", "12000", "--ctx", "4096",
        "--host", "0.0.0.0", "--port", "8091",
    ]  # fmt: skip
    require_llama_server()
    app.options(engine="llama_server", api_key=KEY, mmproj_model=str(app.mmproj), omni_model=str(app.omni), threads=2)
    result = app.run()
    assert result.returncode == 0, result.stderr
    assert app.command() == [
        "llama-server", "-m", str(app.gguf), "--mmproj", str(app.mmproj), "--host", "0.0.0.0", "--port", "8091",
        "-c", "8192", "--parallel", "1", "--threads", "2",
    ]  # fmt: skip
    assert app.environment() == f"LLAMA_API_KEY={KEY}\n"
    assert "omni_model is ignored with engine llama_server" in result.stderr


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"gguf_model": "/share/sarai/missing.gguf"}, "must be inside"),  # the real /share is not a root here
        ({"gguf_model": "{share}/sarai/missing.gguf"}, "gguf_model: no such file: {share}/sarai/missing.gguf"),
        ({"gguf_model": ""}, "gguf_model is not set"),
        ({"gguf_model": "/etc/passwd"}, "gguf_model must be inside"),
        ({"gguf_model": "{share}/../options.json"}, "gguf_model must be inside"),
        ({"gguf_model": "sarai/text.gguf"}, "gguf_model must be an absolute path"),
        ({"gguf_model": "{share}/sarai/not-gguf.bin"}, "gguf_model: {share}/sarai/not-gguf.bin is not a GGUF file"),
        ({"gguf_model": "{share}/sarai/link.gguf"}, "gguf_model must be inside"),  # a link out of /share
        ({"mmproj_model": "{media}/none.gguf"}, "mmproj_model: no such file"),
        ({"omni_model": "{share}/sarai"}, "is not a Qwen2.5-Omni checkpoint (no config.json in it)"),
        ({"omni_model": "{share}/nothing"}, "omni_model: no such folder"),
        ({"engine": "vllm"}, "engine must be 'sarai' or 'llama_server'"),
        ({"context_size": 100}, "context_size must be a whole number from 512 to 131072"),
        ({"api_key": "with space in it"}, "api_key must not contain spaces"),
    ],
)
def test_invalid_options_stop_the_app(app: App, change: dict[str, Any], message: str) -> None:
    """A bad option: exit code 1, one clear message naming it, no server started."""
    (app.share / "sarai" / "not-gguf.bin").write_bytes(b"PK\x03\x04" + bytes(60))
    (app.share / "sarai" / "link.gguf").symlink_to(app.options_file)
    fmt = {"share": str(app.share), "media": str(app.media)}
    app.options(**{"api_key": KEY, **{k: v.format(**fmt) if isinstance(v, str) else v for k, v in change.items()}})
    result = app.run()
    assert result.returncode == 1
    assert message.format(**fmt) in result.stderr
    assert "[sarai_engine] ERROR:" in result.stderr
    assert not (app.out / "command").exists()


def test_omni_needs_torch(app: App, tmp_path: Path) -> None:
    """An Omni checkpoint with a Python that has no PyTorch (the default image) is refused, with the fix."""
    bare = tmp_path / "python-without-site-packages"
    bare.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    bare.chmod(0o755)
    app.options(api_key=KEY, omni_model=str(app.omni))
    assert app.run().returncode == 0  # the test environment has PyTorch and transformers
    result = app.run(SARAI_PYTHON=str(bare))
    assert result.returncode == 1
    assert "omni_model needs PyTorch and transformers" in result.stderr and "WITH_OMNI=true" in result.stderr


def test_api_key_required_when_the_port_is_published(app: App) -> None:
    """No api_key and 8091/tcp published on the host: the app refuses to start."""
    app.options()
    result = app.run(SARAI_HOST_PORT="8091")
    assert result.returncode == 1
    assert "api_key is required: port 8091/tcp is published on the host (port 8091)" in result.stderr
    assert not (app.out / "command").exists()
    # bashio present (new name first, then the deprecated one): the same through it.
    for function in ("bashio::app.port", "bashio::addon.port"):
        result = app.run(prelude=f'{function}() {{ [[ "$1" == 8091/tcp ]] && echo 18091; }}')
        assert result.returncode == 1 and "(port 18091)" in result.stderr, function


def test_api_key_generated_when_the_port_is_private(app: App) -> None:
    """No api_key, port not published: a random key, kept in /data (mode 600) and reused on the next start."""
    app.options()
    result = app.run(prelude="bashio::addon.port() { echo null; }")
    assert result.returncode == 0, result.stderr
    key_file = app.data / "api_key"
    key = key_file.read_text().strip()
    assert len(key) >= 40 and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert app.environment() == f"SARAI_API_KEY={key}\n"
    assert "Generated an API key" in result.stderr and key not in result.stderr
    result = app.run(SARAI_HOST_PORT="")
    assert result.returncode == 0 and "Generated" not in result.stderr
    assert app.environment() == f"SARAI_API_KEY={key}\n"


def test_bashio_logging_is_used_when_loaded(app: App) -> None:
    """With bashio loaded, messages go through bashio::log.*."""
    app.options(api_key=KEY, gguf_model="/nowhere.gguf")
    prelude = "\n".join(f'bashio::log.{lvl}() {{ echo "BASHIO-{lvl}: $*" >&2; }}' for lvl in ("info", "error"))
    result = app.run(prelude=prelude)
    assert result.returncode == 1
    assert "BASHIO-error: gguf_model must be inside" in result.stderr and "[sarai_engine]" not in result.stderr


# -- discovery ------------------------------------------------------------------------------------------


def test_discovery_payload_once_the_engine_answers(app: App, llama_server: LlamaServer) -> None:
    """sarai_announce waits for GET /v1/models with the key, then writes {host, port, api_key, engine}."""
    app.options(api_key=llama_server.api_key)
    result = app.run("sarai_announce", SARAI_PORT=str(llama_server.port))
    assert result.returncode == 0, result.stderr
    assert json.loads((app.out / "discovery.json").read_text()) == {
        "host": HOSTNAME,
        "port": llama_server.port,
        "api_key": llama_server.api_key,
        "engine": "sarai",
    }
    # Through bashio::discovery when bashio is loaded (service name, config JSON).
    prelude = 'bashio::discovery() { printf "%s\\n%s\\n" "$1" "$2" > "$SARAI_OUT/bashio"; }'
    result = app.run(
        "sarai_announce", prelude, SARAI_PORT=str(llama_server.port), SARAI_DRY_RUN="", SARAI_OUT=str(app.out)
    )
    assert result.returncode == 0, result.stderr
    service, config = (app.out / "bashio").read_text().splitlines()
    assert service == "sarai" and json.loads(config)["api_key"] == llama_server.api_key
    assert "Sent the discovery information to Home Assistant" in result.stderr


def test_discovery_not_sent_when_the_engine_never_answers(app: App) -> None:
    """A wrong key (or no server) until the timeout: an error, no discovery message."""
    app.options(api_key=KEY)
    with real_sockets():
        port = free_port()
    result = app.run("sarai_announce", SARAI_PORT=str(port), SARAI_READY_TIMEOUT="1")
    assert result.returncode == 1
    assert f"did not answer on port {port} within 1 s: discovery not sent" in result.stderr
    assert not (app.out / "discovery.json").exists()


async def test_discovery_posted_to_the_supervisor(app: App, llama_server: LlamaServer, socket_enabled: None) -> None:
    """Without bashio: POST {"service": "sarai", "config": ...} to the Supervisor with SUPERVISOR_TOKEN."""
    received: list[tuple[str | None, Any]] = []

    async def discovery(request: web.Request) -> web.Response:
        received.append((request.headers.get("Authorization"), await request.json()))
        return web.json_response({"result": "ok", "data": {"uuid": "abc"}})

    web_app = web.Application()
    web_app.router.add_post("/discovery", discovery)
    app.options(api_key=llama_server.api_key)
    async with local_server(web_app) as url:
        env = app.env(SARAI_PORT=str(llama_server.port), SARAI_DRY_RUN="", SARAI_SUPERVISOR=url, SUPERVISOR_TOKEN="tok")
        proc = await asyncio.create_subprocess_exec(
            "bash", "-c", f"set -euo pipefail; source {RUN_LOGIC}; sarai_announce", env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, stderr.decode()
    assert received == [
        (
            "Bearer tok",
            {
                "service": "sarai",
                "config": {
                    "host": HOSTNAME,
                    "port": llama_server.port,
                    "api_key": llama_server.api_key,
                    "engine": "sarai",
                },
            },
        )
    ]


# -- end to end: the run logic starts the real servers ---------------------------------------------------


@pytest.fixture
def started(app: App) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; terminated and reaped at teardown."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        _servers.stop(proc)


@pytest.mark.parametrize("engine", ["llama_server", "sarai"])
def test_run_logic_starts_the_engine(
    app: App, models_dir: Path, started: list[subprocess.Popen[bytes]], socket_enabled: None, engine: str
) -> None:
    """sarai_main execs the real server with the app's options; sarai_announce then finds it and the key works."""
    if engine == "llama_server":
        require_llama_server()
    elif not (ROOT / "custom_components/sarai/engine/server.py").exists():
        pytest.skip("custom_components/sarai/engine/server.py is not there yet")
    shutil.copy(models_dir / "tiny.gguf", app.gguf)
    shutil.copy(models_dir / "mmproj.gguf", app.mmproj)
    app.options(engine=engine, mmproj_model=str(app.mmproj), context_size=4096, threads=1)
    with real_sockets():
        port = free_port()
    env = app.env(
        SARAI_PORT=str(port),
        SARAI_DRY_RUN="",
        SARAI_PYTHONPATH=str(ROOT / "custom_components/sarai"),
        SARAI_HOST_PORT="",
    )
    log = (app.out / "server.log").open("wb")
    started.append(
        subprocess.Popen(
            ["bash", "-c", f"set -euo pipefail; source {RUN_LOGIC}; sarai_main"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    )
    log.close()
    result = app.run("sarai_announce", SARAI_PORT=str(port), SARAI_READY_TIMEOUT="90")
    assert result.returncode == 0, (result.stderr, (app.out / "server.log").read_text(errors="replace")[-3000:])
    payload = json.loads((app.out / "discovery.json").read_text())
    key = (app.data / "api_key").read_text().strip()
    assert payload == {"host": HOSTNAME, "port": port, "api_key": key, "engine": engine}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        models = json.load(resp)
    assert models["data"][0]["id"]
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10)
    assert err.value.code == 401
    assert started[0].poll() is None  # exec'd: the server is the process started
