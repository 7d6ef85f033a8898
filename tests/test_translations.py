"""Translations: en and es hold the same keys, no URLs (hassfest), every translation key the code raises exists."""

from __future__ import annotations

import json
from pathlib import Path
import re
import string

COMPONENT = Path(__file__).parent.parent / "custom_components/sarai"
EN = json.loads((COMPONENT / "translations/en.json").read_text())
ES = json.loads((COMPONENT / "translations/es.json").read_text())


def _flatten(data: object, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
    else:
        out[prefix] = str(data)
    return out


def _fields(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


def test_same_keys_and_placeholders() -> None:
    """Every string exists in both languages, with the same placeholders."""
    en, es = _flatten(EN), _flatten(ES)
    assert set(en) == set(es), set(en) ^ set(es)
    for key, text in en.items():
        assert _fields(text) == _fields(es[key]), key


def test_no_urls_in_strings() -> None:
    """hassfest rejects URLs in translation strings (they go in description placeholders)."""
    for lang in (EN, ES):
        for key, text in _flatten(lang).items():
            assert not re.search(r"https?://", text), key


def test_every_raised_translation_key_exists() -> None:
    """translation_key="..." and key="..." in the code, and each engine error class's key, are translated,
    and no exception message carries free-form English detail through an {error} placeholder."""
    exceptions = EN["exceptions"]
    source = "\n".join(p.read_text() for p in COMPONENT.rglob("*.py"))
    used = set(re.findall(r'translation_key\s*=\s*"([a-z_]+)"', source))
    used |= set(re.findall(r'\bkey="([a-z_]+)"', source))
    used |= {f"unsupported_{c}" for c in ("hear", "see", "speak", "video")}
    used -= {"tts", "stt", "camera_analysis", "routing_mode", "engine_state", "memory_used", "last_route"}
    used -= {"last_latency", "model_unusable", "budget_too_small"}
    from custom_components.sarai.engine import errors

    for obj in vars(errors).values():
        if isinstance(obj, type) and issubclass(obj, errors.EngineError):
            used.add(obj.translation_key)
    used.discard("unsupported_modality")  # always replaced by the capability's own key
    known = set(exceptions) | set(EN["config"]["error"]) | set(EN["issues"])
    missing = sorted(k for k in used if k not in known)
    assert not missing, missing
    for key, value in exceptions.items():
        assert "{error}" not in value["message"], key
