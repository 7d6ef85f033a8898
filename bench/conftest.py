"""Benchmarks run with the same Home Assistant test harness as the tests."""

from __future__ import annotations

import asyncio

import pytest


@pytest.fixture(autouse=True)
def auto_enable_custom_integrations(enable_custom_integrations: None) -> None:
    """Load custom_components/sarai."""


@pytest.fixture(autouse=True)
async def enable_event_loop_debug() -> None:
    """Replaces the harness's fixture of the same name, which turns asyncio debug mode on.

    Production Home Assistant runs without it (it costs ~3 ms per turn), and so do both sides of
    every comparison here: the raw side runs in a worker thread of this same loop.
    """
    asyncio.get_running_loop().set_debug(False)
