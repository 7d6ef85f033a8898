"""Typed engine errors. The platform layer maps each to a translated Home Assistant error."""

from __future__ import annotations

import os
from typing import Any


class EngineError(Exception):
    """Base class: every engine failure carries a translation key and placeholders.

    The message (``str(err)``) is English detail for the log. What a user sees is the translation
    of ``translation_key`` with ``placeholders``: meaningful values only (a file's name, numbers),
    never a path, an exception text or an object's repr. ``key`` picks a more precise translation
    than the class's own (``InvalidInput("...", key="image_invalid")``). A ``path`` placeholder is
    reduced to the file's name (``file``).
    """

    translation_key = "engine_error"

    def __init__(self, message: str, *, key: str | None = None, **placeholders: Any) -> None:
        """Store a plain message and the values used to translate it."""
        super().__init__(message)
        if key is not None:
            self.translation_key = key
        path = placeholders.pop("path", None)
        if path is not None:
            placeholders.setdefault("file", os.path.basename(str(path).rstrip("/")) or str(path))
        self.placeholders: dict[str, str] = {k: str(v) for k, v in placeholders.items()}


class ModelMissing(EngineError):
    """A configured model file or directory does not exist or cannot be read."""

    translation_key = "model_missing"


class ModelCorrupt(EngineError):
    """A model file exists but cannot be parsed or loaded."""

    translation_key = "model_corrupt"


class DependencyMissing(EngineError):
    """A Python package the configured placement needs is not installed (llama-cpp-python, torch, transformers)."""

    translation_key = "dependency_missing"

    def __init__(self, package: str) -> None:
        """Name the missing package."""
        super().__init__(f"the Python package {package} is not installed", package=package)
        self.package = package


class InsufficientMemory(EngineError):
    """A backend does not fit in the memory budget even after eviction."""

    translation_key = "insufficient_memory"

    def __init__(self, backend: str, needed_mb: int, available_mb: int, budget_mb: int) -> None:
        """Carry the numbers so that the user sees why."""
        super().__init__(
            f"{backend} needs ~{needed_mb} MB but only {available_mb} MB of the {budget_mb} MB budget can be freed",
            backend=backend,
            needed_mb=needed_mb,
            available_mb=available_mb,
            budget_mb=budget_mb,
        )
        self.backend = backend
        self.needed_mb = needed_mb
        self.available_mb = available_mb
        self.budget_mb = budget_mb


class UnsupportedModality(EngineError):
    """The configured models cannot do this (e.g. speech without an Omni checkpoint).

    The translation is per capability: ``unsupported_hear``, ``unsupported_see``, ``unsupported_speak``,
    ``unsupported_video``.
    """

    translation_key = "unsupported_modality"

    def __init__(self, message: str, *, capability: str, **placeholders: Any) -> None:
        """Pick the capability's own translation."""
        super().__init__(message, key=f"unsupported_{capability}", capability=capability, **placeholders)


class ContextOverflow(EngineError):
    """The prompt does not fit in the model context."""

    translation_key = "context_overflow"


class RequestTimeout(EngineError):
    """A request took longer than its timeout."""

    translation_key = "request_timeout"


class InvalidInput(EngineError):
    """Audio, image or video input that cannot be used."""

    translation_key = "invalid_input"


class MediaUnavailable(EngineError):
    """A camera stream could not be opened or stopped delivering data in time."""

    translation_key = "media_unavailable"


class RemoteError(EngineError):
    """The SOLAR server failed (down, timeout, 5xx, malformed answer)."""

    translation_key = "remote_error"


class RemoteAuthError(RemoteError):
    """The SOLAR server rejected the API key (401/403)."""

    translation_key = "remote_auth"


class RemoteProtocolError(RemoteError):
    """The SOLAR server answered something that is not the OpenAI protocol."""

    translation_key = "remote_protocol"
