"""Hardening of everything SARAi reads: special files, least privilege, truncated models, image limits,
user-visible error texts and STT sample rates. Each test fails without the fix it covers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
import io
import json
import os
from pathlib import Path
import re
import socket
import struct
from typing import Any

from homeassistant.components import ai_task, stt
from homeassistant.components.conversation import Attachment
from homeassistant.config_entries import ConfigEntryState
from homeassistant.const import STATE_UNAVAILABLE
from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.exceptions import HomeAssistantError, ServiceValidationError
from homeassistant.helpers import issue_registry as ir
from homeassistant.setup import async_setup_component
import homeassistant.util.dt as dt_util
import numpy as np
import pytest
from pytest_homeassistant_custom_component.common import async_fire_time_changed

from custom_components.sarai.const import DOMAIN
from custom_components.sarai.engine import audio, files
from custom_components.sarai.engine.errors import EngineError, InvalidInput, ModelCorrupt, ModelMissing
from custom_components.sarai.engine.media import prepare_clip, source_name, target_size
from custom_components.sarai.engine.models import (
    GGML_TYPES,
    inspect_gguf,
    inspect_mmproj,
    inspect_omni,
    read_gguf,
)
from custom_components.sarai.engine.omni_backend import (
    MAX_ASPECT,
    MODEL_MAX_PIXELS,
    MODEL_MIN_SIDE,
    fit_size,
    load_image,
)
from custom_components.sarai.errors import to_ha_error
from tests.common import add_camera_analysis, setup_entry as _setup, start_flow

pytestmark = [pytest.mark.usefixtures("ha_core"), pytest.mark.timeout(240)]

PROMPT = 10  # seconds any refusal may take, at most (they are immediate; a hang is the bug)
EXTREME = [(20000, 1), (1, 20000), (1, 1), (3, 50000), (50000, 3), (300, 2)]


# -- helpers -------------------------------------------------------------------------------------


def _png(width: int, height: int, color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def specials(tmp_path: Path) -> Iterator[dict[str, Path]]:
    """A FIFO, a symlink to it, a symlink to /dev/zero, a directory and a UNIX socket, all named like media."""
    root = tmp_path / "allowed"
    root.mkdir()
    fifo = root / "fifo.mp4"
    os.mkfifo(fifo)
    (root / "link.mp4").symlink_to(fifo)
    (root / "zero.jpg").symlink_to("/dev/zero")
    (root / "folder.mp4").mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock.mp4"))
    try:
        yield {
            "root": root,
            "fifo": fifo,
            "link": root / "link.mp4",
            "zero": root / "zero.jpg",
            "folder": root / "folder.mp4",
            "socket": root / "sock.mp4",
        }
    finally:
        sock.close()


SPECIAL_KINDS = ("fifo", "link", "zero", "folder", "socket")


def _user_text(err: BaseException) -> str:
    """What a user sees for an error: the translated message."""
    return str(err)


def _assert_clean(text: str) -> None:
    """No internals: no addresses, errno texts, reprs, tracebacks or paths."""
    assert text, "empty message"
    assert "0x" not in text, text
    assert "Errno" not in text, text
    assert "<" not in text and "object at" not in text, text
    assert "Traceback" not in text, text
    assert not re.search(r"(^|\s)/[\w.-]+/", text), text
    assert "{" not in text, f"untranslated placeholder: {text}"


async def _entity_id(hass: HomeAssistant, domain: str) -> str:
    ids = hass.states.async_entity_ids(domain)
    assert ids, f"no {domain} entity"
    return ids[0]


# -- 1. anything that is not a regular file is refused at once -------------------------------------


@pytest.mark.timeout(60)
def test_files_refuse_special_files(specials: dict[str, Path], tmp_path: Path) -> None:
    """open_regular/read_regular: FIFO, symlinks to FIFO or /dev/zero, directory, socket, missing."""
    for kind in SPECIAL_KINDS:
        with pytest.raises(files.NotRegularError) as err:
            files.read_regular(specials[kind], 1024)
        assert err.value.translation_key == "file_not_regular"
        assert err.value.placeholders == {"file": specials[kind].name}
    with pytest.raises(files.NotRegularError):
        files.open_regular("/dev/zero")
    with pytest.raises(files.MissingError) as missing:
        files.read_regular(tmp_path / "nope.jpg", 10)
    assert missing.value.translation_key == "file_missing"
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 2048)
    with pytest.raises(InvalidInput) as too_large:
        files.read_regular(big, 1024)
    assert too_large.value.translation_key == "file_too_large"
    assert files.read_regular(big, 4096) == b"x" * 2048


def test_open_regular_catches_a_swap_between_check_and_open(
    specials: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file replaced by a FIFO after the stat check: the non-blocking open returns, fstat refuses it."""
    good = tmp_path / "good.mp4"
    good.write_bytes(b"data")
    # The race, made deterministic: the check saw a regular file, the open finds the FIFO.
    monkeypatch.setattr(files, "resolve_regular", lambda path, **_kw: str(specials["fifo"]))
    with pytest.raises(files.NotRegularError, match="became a FIFO"):
        files.open_regular(good)
    # A symlink swapped in after the check is not followed (O_NOFOLLOW).
    monkeypatch.setattr(files, "resolve_regular", lambda path, **_kw: str(specials["link"]))
    with pytest.raises(files.MissingError):
        files.open_regular(good)


@pytest.mark.timeout(60)
def test_prepare_clip_refuses_special_files_and_non_network_schemes(
    specials: dict[str, Path], clip_path: Path, tmp_path: Path
) -> None:
    """Bare paths and file:// URLs must be regular files; pipe:, concat:, fd:, data: are refused; playlists too."""
    for kind in SPECIAL_KINDS:
        for source in (str(specials[kind]), f"file://{specials[kind]}"):
            with pytest.raises(files.NotRegularError):
                prepare_clip(source, 2, 2)
    for scheme_source in (
        "pipe:0",
        f"concat:{specials['fifo']}",
        "fd:0",
        "data:video/mp4;base64,AAAA",
        "unix:/run/socket",
    ):
        with pytest.raises(InvalidInput) as err:
            prepare_clip(scheme_source, 2, 2)
        assert err.value.translation_key == "video_source_unsupported", scheme_source
    # FFmpeg's "subfile,,...,:path" syntax is no URL scheme: it is a (missing) local file SARAi opens itself.
    with pytest.raises(files.MissingError):
        prepare_clip(f"subfile,,start,0,end,0,,:{clip_path}", 2, 2)
    # A playlist naming /dev/zero and the FIFO is not a container FFmpeg may open from a local file.
    playlist = tmp_path / "list.m3u8"
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2,\n{specials['fifo']}\n#EXT-X-ENDLIST\n")
    with pytest.raises(InvalidInput) as err:
        prepare_clip(str(playlist), 2, 2)
    assert err.value.translation_key == "video_invalid"
    # The real clip still works from a path and from a file:// URL.
    assert len(prepare_clip(f"file://{clip_path}", 6, 2).frame_times) == 10
    assert source_name("rtsp://user:secret@192.168.1.5:554/live") == "rtsp://192.168.1.5"
    assert source_name(f"file://{clip_path}") == clip_path.name


@pytest.mark.timeout(60)
def test_models_refuse_special_files(specials: dict[str, Path], omni_path: str, tmp_path: Path) -> None:
    """inspect_gguf / inspect_mmproj / inspect_omni: a FIFO, /dev/zero, a directory, a socket, a symlink to any."""
    import shutil

    for kind in SPECIAL_KINDS:
        for inspect in (inspect_gguf, inspect_mmproj):
            with pytest.raises(ModelCorrupt) as err:
                inspect(specials[kind])
            assert err.value.translation_key == "file_not_regular"
    with pytest.raises(ModelCorrupt) as err:
        inspect_gguf("/dev/zero")
    assert err.value.translation_key == "file_not_regular"
    with pytest.raises(ModelCorrupt):
        inspect_omni(specials["fifo"])  # the Omni "directory" is a FIFO
    with pytest.raises(ModelMissing):
        inspect_omni(tmp_path / "no-such-dir")
    # Inside the checkpoint: config.json, a weights file or any other file being a FIFO or a device.
    for name, target in (("config.json", "fifo"), ("model.safetensors", "fifo"), ("preprocessor_config.json", "zero")):
        broken = tmp_path / f"omni-{name}"
        shutil.copytree(omni_path, broken)
        victim = broken / name
        if victim.exists():
            victim.unlink()
        victim.symlink_to(specials[target])
        with pytest.raises(ModelCorrupt) as err:
            inspect_omni(broken)
        assert err.value.translation_key == "file_not_regular", name
        assert err.value.placeholders["file"] == name
    # Sub-directories are fine; missing, odd or unparsable files are typed errors.
    odd = tmp_path / "omni-odd"
    shutil.copytree(omni_path, odd)
    (odd / "subdir").mkdir()
    assert inspect_omni(odd).parameters > 0
    weights = next(odd.glob("*.safetensors"))
    good = weights.read_bytes()
    for blob in (struct.pack("<Q", 1 << 20) + b"{}", struct.pack("<Q", 2) + b"[]", struct.pack("<Q", 9) + b'{"w": {}}'):
        weights.write_bytes(blob)
        with pytest.raises(ModelCorrupt):
            inspect_omni(odd)
    weights.write_bytes(good)
    for name in ("tokenizer_config.json", "tokenizer.json"):
        if (odd / name).exists():
            (odd / name).unlink()
    with pytest.raises(ModelMissing, match="tokenizer"):
        inspect_omni(odd)
    (odd / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelCorrupt):
        inspect_omni(odd)
    (odd / "config.json").unlink()
    with pytest.raises(ModelMissing, match=r"config\.json"):
        inspect_omni(odd)


async def test_analyze_video_refuses_special_files_promptly(
    hass: HomeAssistant, make_entry, omni_path: str, specials: dict[str, Path], clip_path: Path, front_door
) -> None:
    """sarai.analyze_video with a FIFO (or a link to it, a directory, a socket) inside the allowlist, and
    camera stream sources that are FIFOs or non-network schemes: translated errors at once; HA stops cleanly."""
    root = specials["root"]
    (root / "escape.mp4").symlink_to(clip_path)  # a link inside the allowlist to a file outside it
    hass.config.allowlist_external_dirs = {str(root)}
    entry = make_entry({"omni_model": omni_path})
    await _setup(hass, entry)
    cases: list[tuple[dict[str, Any], str]] = [
        *(({"file_path": str(specials[k])}, "file_not_regular") for k in ("fifo", "link", "folder", "socket")),
        ({"file_path": str(specials["zero"])}, "path_not_allowed"),  # resolves to /dev/zero, outside
        ({"file_path": str(root / "escape.mp4")}, "path_not_allowed"),
        ({"file_path": "relative/door.mp4"}, "path_not_allowed"),
        ({"file_path": str(root / "missing.mp4")}, "file_missing"),
    ]
    for data, key in cases:
        async with asyncio.timeout(PROMPT):
            with pytest.raises(ServiceValidationError) as err:
                await hass.services.async_call(DOMAIN, "analyze_video", data, blocking=True, return_response=True)
        assert err.value.translation_key == key, (data, err.value)
        _assert_clean(_user_text(err.value))
    hass.config.allowlist_external_dirs = {str(root), "/dev"}  # even an allowlisted device is refused
    async with asyncio.timeout(PROMPT):
        with pytest.raises(ServiceValidationError) as err:
            await hass.services.async_call(
                DOMAIN, "analyze_video", {"file_path": "/dev/zero"}, blocking=True, return_response=True
            )
    assert err.value.translation_key == "file_not_regular"
    for source, key in (
        (str(specials["fifo"]), "file_not_regular"),
        (f"file://{specials['link']}", "file_not_regular"),
        ("/dev/zero", "file_not_regular"),
        ("pipe:0", "video_source_unsupported"),
        (f"concat:{specials['fifo']}", "video_source_unsupported"),
    ):
        front_door.source = source
        async with asyncio.timeout(PROMPT):
            with pytest.raises(ServiceValidationError) as err:
                await hass.services.async_call(
                    DOMAIN,
                    "analyze_video",
                    {"camera_entity_id": "camera.front_door"},
                    blocking=True,
                    return_response=True,
                )
        assert err.value.translation_key == key, source
        _assert_clean(_user_text(err.value))
    assert await hass.config_entries.async_unload(entry.entry_id)
    # Nothing is left blocked in the executor: the harness stops Home Assistant after the test and
    # fails it on lingering threads or a shutdown that does not finish.


async def test_ai_task_attachments_refuse_special_files(
    hass: HomeAssistant, make_entry, omni_path: str, specials: dict[str, Path]
) -> None:
    """Image and video attachments that are FIFOs, links to FIFOs or /dev/zero, directories or sockets."""
    entry = make_entry({"omni_model": omni_path}, {"llm_hass_api": []})
    await _setup(hass, entry)
    entity = hass.data[ai_task.DATA_COMPONENT].get_entity(await _entity_id(hass, "ai_task"))
    for mime in ("image/jpeg", "video/mp4"):
        for kind in SPECIAL_KINDS:
            task = ai_task.GenDataTask(
                name="t", instructions="x", attachments=[Attachment("media-source://x", mime, specials[kind])]
            )
            async with asyncio.timeout(PROMPT):
                with pytest.raises(ServiceValidationError) as err:
                    await entity._describe_attachments(task)
            assert err.value.translation_key == "file_not_regular", (mime, kind)
            _assert_clean(_user_text(err.value))
    assert await hass.config_entries.async_unload(entry.entry_id)


@pytest.mark.parametrize(("field", "kind"), [("gguf_model", k) for k in SPECIAL_KINDS] + [("mmproj_model", "fifo")])
async def test_config_flow_refuses_special_files(
    hass: HomeAssistant, gguf_path: str, specials: dict[str, Path], field: str, kind: str
) -> None:
    """A model path that is a FIFO, /dev/zero (via a link), a directory or a socket is a form error at once."""

    result = await start_flow(hass)
    data = {"gguf_model": gguf_path, "memory_budget_mb": 12000, field: str(specials[kind])}
    async with asyncio.timeout(PROMPT):
        result = await hass.config_entries.flow.async_configure(result["flow_id"], data)
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {field: "file_not_regular"}


async def test_setup_refuses_a_fifo_model(hass: HomeAssistant, make_entry, specials: dict[str, Path]) -> None:
    """An entry whose GGUF became a FIFO fails setup at once with a repair issue naming the file."""
    entry = make_entry({"gguf_model": str(specials["link"])})
    entry.add_to_hass(hass)
    async with asyncio.timeout(PROMPT):
        assert not await hass.config_entries.async_setup(entry.entry_id)
    assert entry.state is ConfigEntryState.SETUP_ERROR
    issue = ir.async_get(hass).async_get_issue(DOMAIN, "model_unusable")
    assert issue is not None and issue.translation_placeholders == {"file": "link.mp4"}


# -- 2. least privilege: analyze_video is an admin action -------------------------------------------


async def test_analyze_video_is_admin_only(
    hass: HomeAssistant,
    make_entry,
    omni_path: str,
    clip_path: Path,
    front_door,
    solar,
    hass_ws_client,
    hass_client,
    hass_read_only_access_token: str,
    hass_access_token: str,
) -> None:
    """A read-only user is refused over the websocket and REST (file and camera); an admin is served."""
    hass.config.allowlist_external_dirs = {str(clip_path.parent)}
    entry = make_entry({"omni_model": omni_path, "solar_url": solar.url}, {"routing_mode": "remote"})
    await _setup(hass, entry)
    assert await async_setup_component(hass, "api", {})
    requests = [
        {"file_path": str(clip_path), "duration": 1},
        {"camera_entity_id": "camera.front_door", "duration": 1},
    ]
    user = await hass_ws_client(hass, hass_read_only_access_token)
    for data in requests:
        await user.send_json_auto_id(
            {
                "type": "call_service",
                "domain": DOMAIN,
                "service": "analyze_video",
                "service_data": data,
                "return_response": True,
            }
        )
        msg = await user.receive_json()
        assert msg["success"] is False, msg
        assert msg["error"]["message"] == "Unauthorized", msg  # raised by the admin-service wrapper
    rest = await hass_client(hass_read_only_access_token)
    resp = await rest.post(f"/api/services/{DOMAIN}/analyze_video?return_response", json=requests[0])
    assert resp.status == 401
    admin = await hass_ws_client(hass, hass_access_token)
    for data in requests:
        solar.replies = [{"text": json.dumps({"events": []})}]
        await admin.send_json_auto_id(
            {
                "type": "call_service",
                "domain": DOMAIN,
                "service": "analyze_video",
                "service_data": data,
                "return_response": True,
            }
        )
        msg = await admin.receive_json()
        assert msg["success"] is True, msg
        assert msg["result"]["response"]["frames"] >= 1
    assert await hass.config_entries.async_unload(entry.entry_id)


# -- 3. truncated model files -----------------------------------------------------------------------


def test_ggml_type_table_matches_libggml() -> None:
    """The integration's ggml type table agrees with the bundled libggml for every type it knows."""
    import ctypes

    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_blck_size.restype = ctypes.c_int64
    lib.ggml_type_size.restype = ctypes.c_size_t
    known = {t: (lib.ggml_blck_size(t), lib.ggml_type_size(t)) for t in range(llama_cpp.GGML_TYPE_COUNT)}
    assert GGML_TYPES == {t: v for t, v in known.items() if v[0] > 0}


def test_truncated_and_hostile_gguf_headers(tmp_path: Path, gguf_path: str, mmproj_path: str) -> None:
    """Cut anywhere in the data, or with absurd counts, types, dims or offsets: ModelCorrupt, fast, bounded."""
    for source in (gguf_path, mmproj_path):
        data = Path(source).read_bytes()
        info = read_gguf(source)
        assert info.data_start + max(t.offset + t.n_bytes for t in info.tensors) == len(data)
        for cut in (len(data) // 2, len(data) - 1, info.data_start):
            bad = tmp_path / f"cut-{cut}.gguf"
            bad.write_bytes(data[:cut])
            with pytest.raises(ModelCorrupt) as err:
                read_gguf(bad)
            assert err.value.translation_key == "model_truncated"
            assert err.value.placeholders["file"] == bad.name
    inspect_gguf(gguf_path)
    inspect_mmproj(mmproj_path, inspect_gguf(gguf_path))

    def header(n_tensors: int, kv: bytes = b"", n_kv: int = 0) -> bytes:
        return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kv

    def tensor(name: bytes = b"w", dims: tuple[int, ...] = (32,), ggml_type: int = 0, offset: int = 0) -> bytes:
        out = struct.pack("<Q", len(name)) + name + struct.pack("<I", len(dims))
        out += b"".join(struct.pack("<Q", d) for d in dims)
        return out + struct.pack("<IQ", ggml_type, offset)

    def kv(key: bytes, vtype: int, payload: bytes) -> bytes:
        return struct.pack("<Q", len(key)) + key + struct.pack("<I", vtype) + payload

    pad = b"\0" * 4096
    hostile = {
        "not-gguf": b"JPEG" + pad,
        "short-header": b"GGUF" + struct.pack("<I", 3),
        "many-tensors": header(1 << 60) + pad,
        "many-kv": header(0, n_kv=1 << 60) + pad,
        "huge-array": header(0, kv(b"a", 9, struct.pack("<IQ", 4, 1 << 61)), 1) + pad,
        "huge-string-array": header(0, kv(b"a", 9, struct.pack("<IQ", 8, 1 << 61)), 1) + pad,
        "bad-array-type": header(0, kv(b"a", 9, struct.pack("<IQ", 77, 1)), 1) + pad,
        "deep-array": header(0, kv(b"a", 9, struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 9, 1) * 8), 1) + pad,
        "five-dims": header(1) + tensor(dims=(1, 1, 1, 1, 1)) + pad,
        "zero-dims": header(1) + tensor(dims=()) + pad,
        "unknown-type": header(1) + tensor(ggml_type=4) + pad,
        "future-type": header(1) + tensor(ggml_type=99) + pad,
        "partial-block": header(1) + tensor(dims=(33,), ggml_type=8) + pad,
        "huge-dim": header(1) + tensor(dims=(1 << 63,)) + pad,
        "long-name": header(1) + tensor(name=b"n" * 64) + pad,
        "misaligned": header(1) + tensor(offset=3) + pad,
        "bad-alignment": header(0, kv(b"general.alignment", 4, struct.pack("<I", 24)), 1) + pad,
        "beyond-file": header(1) + tensor(dims=(1 << 40,)) + pad,
    }
    for name, blob in hostile.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(blob)
        with pytest.raises(ModelCorrupt):
            read_gguf(path)
    ok = tmp_path / "ok.gguf"
    body = header(1, kv(b"general.alignment", 4, struct.pack("<I", 64)), 1) + tensor(dims=(32, 2))
    ok.write_bytes(body + b"\0" * (-len(body) % 64) + b"\0" * 256)
    assert read_gguf(ok).tensors[0].n_bytes == 256


@pytest.mark.parametrize("field", ["gguf_model", "mmproj_model"])
async def test_truncated_models_fail_flow_and_setup(
    hass: HomeAssistant, make_entry, tmp_path: Path, gguf_path: str, mmproj_path: str, field: str
) -> None:
    """Half a GGUF or half an mmproj: a form error in the config flow, ConfigEntryError + repair at setup."""

    source = gguf_path if field == "gguf_model" else mmproj_path
    half = tmp_path / Path(source).name
    data = Path(source).read_bytes()
    half.write_bytes(data[: len(data) // 2])
    base = {"gguf_model": gguf_path, "mmproj_model": mmproj_path, "memory_budget_mb": 12000}
    result = await start_flow(hass)
    result = await hass.config_entries.flow.async_configure(result["flow_id"], {**base, field: str(half)})
    assert result["errors"] == {field: f"{field.split('_')[0]}_truncated"}
    result = await hass.config_entries.flow.async_configure(result["flow_id"], base)  # the intact files pass
    assert result["type"] is FlowResultType.CREATE_ENTRY
    await hass.async_block_till_done()
    good = hass.config_entries.async_entries(DOMAIN)[0]
    assert good.state is ConfigEntryState.LOADED
    assert await hass.config_entries.async_remove(good.entry_id)

    entry = make_entry({"mmproj_model": mmproj_path, field: str(half)})
    entry.add_to_hass(hass)
    assert not await hass.config_entries.async_setup(entry.entry_id)
    assert entry.state is ConfigEntryState.SETUP_ERROR
    assert entry.reason
    issue = ir.async_get(hass).async_get_issue(DOMAIN, "model_unusable")
    assert issue is not None and issue.translation_placeholders == {"file": half.name}


# -- 4. images outside the model limits, in any orientation -----------------------------------------


def test_fit_size_in_any_orientation() -> None:
    """Letterboxed to 1:50, scaled up to 56 px, scaled down to the pixel budget; sides multiples of 28."""
    for width, height in [*EXTREME, (1, 1000), (5000, 4000), (30000, 10), (57, 57 * 51)]:
        fit = fit_size(width, height)
        assert fit is not None, (width, height)
        (cw, ch), (w, h) = fit
        assert cw % 28 == 0 and ch % 28 == 0
        assert min(cw, ch) >= MODEL_MIN_SIDE and cw * ch <= MODEL_MAX_PIXELS
        assert max(cw, ch) <= MAX_ASPECT * min(cw, ch)
        assert 1 <= w <= cw and 1 <= h <= ch
    assert fit_size(640, 480) is None and fit_size(56, 56 * 50) is None
    assert target_size(20000, 1, 448 * 448) == (28, 28)
    assert target_size(1, 20000, 448 * 448) == (28, 28)
    w, h = target_size(20000, 400, 448 * 448)
    assert max(w, h) / min(w, h) < 200


async def test_engine_sees_extreme_images(gguf_path: str, mmproj_path: str, omni_path: str) -> None:
    """20000x1, 1x20000, 1x1, 3x50000 ... through libmtmd (GGUF + mmproj) and through the Omni processor."""
    from custom_components.sarai.engine import EngineConfig, SaraiEngine

    for extra in ({"mmproj_model": mmproj_path}, {"omni_model": omni_path}):
        engine = SaraiEngine(EngineConfig(gguf_model=gguf_path, n_ctx=16384, **extra))
        try:
            for width, height in EXTREME:
                answer = await engine.describe_image(_png(width, height), "¿Qué hay?", max_tokens=2)
                assert isinstance(answer, str), (extra, width, height)
        finally:
            await engine.close()


def test_image_decoding_limits_and_errors() -> None:
    """EXIF rotation, a huge JPEG decoded reduced, a bomb refused, unreadable bytes: precise keys."""
    from PIL import Image

    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    Image.new("RGB", (120, 60)).save(buf, format="JPEG", exif=exif)
    assert load_image(buf.getvalue()).size == (60, 120)
    buf = io.BytesIO()
    Image.new("RGB", (9000, 6000), (10, 20, 30)).save(buf, format="JPEG", quality=10)
    big = load_image(buf.getvalue())  # 54 megapixels: decoded at 1/4 by libjpeg, then fitted
    assert big.width * big.height <= MODEL_MAX_PIXELS
    buf = io.BytesIO()
    Image.new("1", (8000, 8000)).save(buf, format="PNG")
    with pytest.raises(InvalidInput) as err:
        load_image(buf.getvalue())
    assert err.value.translation_key == "image_too_large"
    assert err.value.placeholders == {"width": "8000", "height": "8000", "max_mp": "40"}
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="TIFF")
    with pytest.raises(InvalidInput) as err:
        load_image(buf.getvalue())
    assert err.value.translation_key == "image_format" and err.value.placeholders == {"format": "TIFF"}
    for data in (b"", b"hello", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, _png(64, 64)[:60]):
        with pytest.raises(InvalidInput) as err:
            load_image(data)
        assert err.value.translation_key == "image_invalid"
    with pytest.raises(InvalidInput) as err:
        load_image(b"\xff" * (20 * 1024 * 1024 + 1))
    assert err.value.translation_key == "image_bytes_too_large"


@pytest.mark.parametrize("model", ["mmproj", "omni"])
async def test_camera_analysis_extreme_images_errors_and_availability(
    hass: HomeAssistant, make_entry, mmproj_path: str, omni_path: str, front_door, model: str
) -> None:
    """image_processing.scan on extreme images answers; unusable images and a missing camera set a translated
    last_error every time; repeated failures or a missing camera make the entity unavailable; success recovers."""
    data = {"mmproj_model": mmproj_path} if model == "mmproj" else {"omni_model": omni_path}
    entry = make_entry(data)
    entry.add_to_hass(hass)
    add_camera_analysis(hass, entry, "Door")
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    entity_id = await _entity_id(hass, "image_processing")
    from homeassistant.components.image_processing.const import DATA_COMPONENT

    entity = hass.data[DATA_COMPONENT].get_entity(entity_id)

    def last_error() -> Any:  # an unavailable state carries no attributes: read the entity's
        return entity.extra_state_attributes["last_error"]

    async def scan() -> Any:
        await hass.services.async_call("image_processing", "scan", {"entity_id": entity_id}, blocking=True)
        return hass.states.get(entity_id)

    for width, height in EXTREME:
        front_door.image = _png(width, height)
        state = await scan()
        assert state.attributes["last_error"] is None, (width, height, state.attributes["last_error"])
        assert state.attributes["description"] is not None
    # Unusable images: a translated sentence each time, never a traceback, never internals.
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="TIFF")
    for image in (b"not an image", buf.getvalue()):
        front_door.image = image
        state = await scan()
        _assert_clean(state.attributes["last_error"])
        assert state.state != STATE_UNAVAILABLE
    front_door.image = _png(64, 64)
    state = await scan()
    assert state.attributes["last_error"] is None
    # Three failures in a row: unavailable; the retry while failing brings it back once images work.
    front_door.image = b"garbage"
    for _ in range(3):
        state = await scan()
    assert state.state == STATE_UNAVAILABLE
    _assert_clean(last_error())
    front_door.image = _png(64, 64)
    async_fire_time_changed(hass, dt_util.utcnow() + __import__("datetime").timedelta(minutes=6))
    await hass.async_block_till_done()
    state = hass.states.get(entity_id)
    assert state.state != STATE_UNAVAILABLE and state.attributes["last_error"] is None
    # The camera goes away: unavailable with a message; it comes back: available again.
    hass.states.async_set("camera.front_door", STATE_UNAVAILABLE)
    await hass.async_block_till_done()
    state = hass.states.get(entity_id)
    assert state.state == STATE_UNAVAILABLE
    assert "camera.front_door" in last_error()
    _assert_clean(last_error())
    await entity.async_update()  # a timed scan while the camera is away: says so, stays unavailable
    assert "camera.front_door" in last_error() and not entity.available
    hass.states.async_set("camera.front_door", "idle")
    await hass.async_block_till_done()
    assert hass.states.get(entity_id).state != STATE_UNAVAILABLE

    # A camera that fails in an unexpected way: a translated sentence, not a traceback.
    async def broken_camera(width: int | None = None, height: int | None = None) -> bytes | None:
        raise RuntimeError("driver crashed at 0xdeadbeef")

    front_door.async_camera_image = broken_camera
    state = await scan()
    _assert_clean(state.attributes["last_error"])
    await scan()
    await scan()
    assert hass.states.get(entity_id).state == STATE_UNAVAILABLE
    # The camera drops out and comes back while failing: still unavailable, a retry is scheduled.
    hass.states.async_set("camera.front_door", STATE_UNAVAILABLE)
    await hass.async_block_till_done()
    hass.states.async_set("camera.front_door", "idle")
    await hass.async_block_till_done()
    assert hass.states.get(entity_id).state == STATE_UNAVAILABLE
    assert entity._retry is not None
    assert await hass.config_entries.async_unload(entry.entry_id)  # cancels the pending retry
    assert entity._retry is None


@pytest.mark.parametrize("model", ["mmproj", "omni"])
async def test_ai_task_extreme_image_attachments(
    hass: HomeAssistant, make_entry, mmproj_path: str, omni_path: str, front_door, tmp_path: Path, model: str
) -> None:
    """ai_task.generate_data with extreme camera snapshots (media source) and local image files."""
    assert await async_setup_component(hass, "media_source", {})
    data = {"mmproj_model": mmproj_path} if model == "mmproj" else {"omni_model": omni_path}
    entry = make_entry(data, {"llm_hass_api": []})
    await _setup(hass, entry)
    entity_id = await _entity_id(hass, "ai_task")
    for width, height in ((20000, 1), (1, 20000), (1, 1)):
        front_door.image = _png(width, height)
        result = await ai_task.async_generate_data(
            hass,
            task_name="door",
            entity_id=entity_id,
            instructions="¿Qué hay?",
            attachments=[
                {"media_content_id": "media-source://camera/camera.front_door", "media_content_type": "image/png"}
            ],
        )
        assert isinstance(result.data, str)
    entity = hass.data[ai_task.DATA_COMPONENT].get_entity(entity_id)
    local = tmp_path / "tall.png"
    local.write_bytes(_png(3, 50000))
    task = ai_task.GenDataTask(
        name="t", instructions="x", attachments=[Attachment("media-source://x", "image/png", local)]
    )
    assert len(await entity._describe_attachments(task)) == 1
    assert await hass.config_entries.async_unload(entry.entry_id)


# -- 5. error texts expose nothing internal ----------------------------------------------------------


async def test_user_visible_errors_have_no_internals(
    hass: HomeAssistant, make_entry, omni_path: str, clip_path: Path, tmp_path: Path, front_door
) -> None:
    """A corrupt image, a corrupt clip, a clip without video, a missing file: translated, precise, clean."""
    hass.config.allowlist_external_dirs = {str(tmp_path)}
    entry = make_entry({"omni_model": omni_path}, {"llm_hass_api": []})
    await _setup(hass, entry)
    corrupt_clip = tmp_path / "broken.mp4"
    corrupt_clip.write_bytes(clip_path.read_bytes()[:3000])
    garbage_clip = tmp_path / "garbage.mp4"
    garbage_clip.write_bytes(b"\0" * 4096)
    sound_only = tmp_path / "sound.wav"
    sound_only.write_bytes(audio.wav_bytes(b"\0\0" * 16000, 16000))
    cases = [
        ({"file_path": str(corrupt_clip)}, "video_invalid", "broken.mp4"),
        ({"file_path": str(garbage_clip)}, "video_invalid", "garbage.mp4"),
        ({"file_path": str(sound_only)}, "video_no_stream", "sound.wav"),
        ({"file_path": str(tmp_path / "nowhere.mp4")}, "file_missing", "nowhere.mp4"),
        ({"file_path": "/etc/passwd"}, "path_not_allowed", "passwd"),
    ]
    for data, key, name in cases:
        with pytest.raises(ServiceValidationError) as err:
            await hass.services.async_call(DOMAIN, "analyze_video", data, blocking=True, return_response=True)
        assert err.value.translation_key == key
        text = _user_text(err.value)
        _assert_clean(text)
        assert name in text, text
    entity = hass.data[ai_task.DATA_COMPONENT].get_entity(await _entity_id(hass, "ai_task"))
    fake = tmp_path / "fake.jpg"
    fake.write_bytes(b"\xff\xd8 not really a jpeg")
    for path, mime, key in (
        (fake, "image/jpeg", "image_invalid"),
        (tmp_path / "gone.jpg", "image/jpeg", "file_missing"),
        (corrupt_clip, "video/mp4", "video_invalid"),
    ):
        task = ai_task.GenDataTask(name="t", instructions="x", attachments=[Attachment("media-source://x", mime, path)])
        with pytest.raises(HomeAssistantError) as err:
            await entity._describe_attachments(task)
        assert err.value.translation_key == key
        _assert_clean(_user_text(err.value))
    # Every new key is translated in English and Spanish with the same placeholders.
    root = Path(__file__).parent.parent / "custom_components" / "sarai" / "translations"
    en = json.loads((root / "en.json").read_text())["exceptions"]
    es = json.loads((root / "es.json").read_text())["exceptions"]
    for key in (
        "file_missing",
        "file_not_regular",
        "file_too_large",
        "model_truncated",
        "image_invalid",
        "image_format",
        "image_too_large",
        "image_bytes_too_large",
        "audio_invalid",
        "audio_empty",
        "video_invalid",
        "video_no_stream",
        "video_duration",
        "video_fps",
        "video_source_unsupported",
        "camera_unavailable",
        "path_not_allowed",
        "attachment_too_large",
    ):
        assert set(re.findall(r"{(\w+)}", en[key]["message"])) == set(re.findall(r"{(\w+)}", es[key]["message"]))
    for err_obj in (
        InvalidInput("x", key="video_duration", max_s=30),
        InvalidInput("x", key="video_fps", max_fps=8),
        InvalidInput("x", key="audio_invalid"),
        InvalidInput("x", key="audio_empty"),
        ModelCorrupt("x", key="model_truncated", path="/a/b/m.gguf", size_mb="1.0", needed_mb="2.0"),
    ):
        _assert_clean(str(to_ha_error(err_obj)))
    assert await hass.config_entries.async_unload(entry.entry_id)


def test_engine_errors_for_bad_audio_and_requests(clip_path: Path) -> None:
    """WAV that is not 16-bit, a WAV without a rate, empty audio, silly durations: precise keys."""
    import wave

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(8000)
        w.writeframes(b"\x80" * 80)
    for data in (buf.getvalue(), b"RIFF....WAVEjunk"):
        with pytest.raises(InvalidInput) as err:
            audio.decode_wav(data)
        assert err.value.translation_key == "audio_invalid"
    zero_rate = bytearray(audio.wav_bytes(b"\0\0" * 10, 16000))
    zero_rate[24:28] = struct.pack("<I", 0)
    with pytest.raises(InvalidInput) as err:
        audio.decode_wav(bytes(zero_rate))
    assert err.value.translation_key == "audio_invalid"
    with pytest.raises(InvalidInput) as err:
        audio.to_hearing_input(np.zeros(0, np.float32), 16000)
    assert err.value.translation_key == "audio_empty"
    with pytest.raises(InvalidInput):
        audio.resample(np.ones(10, np.float32), 0, 16000)
    for duration, fps, key in ((0, 2, "video_duration"), (31, 2, "video_duration"), (5, 0, "video_fps")):
        with pytest.raises(InvalidInput) as err:
            prepare_clip(str(clip_path), duration, fps)
        assert err.value.translation_key == key
    assert isinstance(EngineError("x"), Exception)


# -- 6. STT at every advertised sample rate -----------------------------------------------------------


def test_resample_is_band_limited() -> None:
    """48 kHz -> 16 kHz keeps a 1 kHz tone and removes a 12 kHz one (linear interpolation folds it to 4 kHz)."""
    rate = 48000
    t = np.arange(rate) / rate
    low = audio.resample(np.sin(2 * np.pi * 1000 * t).astype(np.float32), rate, 16000)
    high = audio.resample(np.sin(2 * np.pi * 12000 * t).astype(np.float32), rate, 16000)
    assert low.size == high.size == 16000
    assert np.sqrt(np.mean(low[1000:-1000] ** 2)) > 0.6
    assert np.sqrt(np.mean(high[1000:-1000] ** 2)) < 0.05
    assert audio.resample(np.ones(8000, np.float32), 8000, 16000).size == 16000
    assert audio.resample(np.ones(441, np.float32), 44100, 16000).size == 160
    assert audio.resample(np.ones(10, np.float32), 8000, 16000).size == 20  # too short for the filter: padded


@pytest.mark.parametrize(("rate", "channels"), [(44100, 1), (48000, 2), (8000, 1), (22000, 1)])
async def test_stt_http_endpoint_other_rates(
    hass: HomeAssistant, make_entry, mmproj_path: str, hass_client, rate: int, channels: int
) -> None:
    """Home Assistant's STT endpoint accepts raw PCM at other rates (and stereo), and SARAi transcribes it."""
    from devtools.media import make_speech_wav

    assert await async_setup_component(hass, "http", {})
    entry = make_entry({"mmproj_model": mmproj_path})
    await _setup(hass, entry)
    entity = stt.async_get_speech_to_text_entity(hass, "stt.sarai_speech_to_text")
    assert rate in entity.supported_sample_rates and channels in entity.supported_channels
    samples, src_rate = audio.decode_wav(make_speech_wav())
    pcm = audio.float_to_pcm16(audio.resample(samples, src_rate, rate))
    if channels == 2:
        mono = np.frombuffer(pcm, "<i2")
        pcm = np.stack([mono, mono], axis=1).astype("<i2").tobytes()
    client = await hass_client()
    resp = await client.post(
        "/api/stt/stt.sarai_speech_to_text",
        data=pcm,
        headers={
            "X-Speech-Content": f"format=wav; codec=pcm; sample_rate={rate}; bit_rate=16; channel={channels}; "
            "language=es"
        },
    )
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["result"] == "success" and body["text"], body
    assert await hass.config_entries.async_unload(entry.entry_id)
