"""Client for the SOLAR fallback: any OpenAI-compatible server (llama.cpp server, vLLM, a SARAi server).

A thin layer on ``openai_client.OpenAIClient``: every failure is a ``RemoteError`` (so that the engine answers
locally when SOLAR fails before its first word), and messages name "the SOLAR server". The aiohttp session is
injected by the caller (Home Assistant's shared session)."""

from __future__ import annotations

import aiohttp

from .openai_client import MAX_KEY_LENGTH, MAX_URL_LENGTH, OpenAIClient, redact_url, validate_api_key, validate_url

__all__ = ["MAX_KEY_LENGTH", "MAX_URL_LENGTH", "SolarClient", "redact_url", "validate_api_key", "validate_url"]


class SolarClient(OpenAIClient):
    """Talks /v1/models and /v1/chat/completions (SSE streaming, tool calls) to the SOLAR server.

    ``read_timeout`` bounds the wait for the first byte of an answer and between two chunks of it.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        api_key: str | None = None,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        total_timeout: float = 180.0,
        verify_ssl: bool = True,
    ) -> None:
        """Configure; nothing is sent until a call."""
        super().__init__(
            session,
            base_url,
            api_key,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            total_timeout=total_timeout,
            verify_ssl=verify_ssl,
            label="SOLAR server",
            remote_errors=True,
        )
