"""SARAi engine: model manager, backends, media, SOLAR client and router.

No Home Assistant imports here: the API is made of plain values so that it could run in a
worker process or a separate server.
"""

from .core import ChatTurn, EngineConfig, RouteInfo, SaraiEngine
from .errors import EngineError
from .types import ChatDelta, ChatMessage, ChatRequest, ToolCall, ToolSpec

__all__ = [
    "ChatDelta",
    "ChatMessage",
    "ChatRequest",
    "ChatTurn",
    "EngineConfig",
    "EngineError",
    "RouteInfo",
    "SaraiEngine",
    "ToolCall",
    "ToolSpec",
]
