"""Video events: the question asked of Omni, the JSON schema of the answer, and its validation."""

from __future__ import annotations

import json
from typing import Any

from .types import ChatMessage

DEFAULT_LABELS = [
    "person",
    "vehicle",
    "package",
    "animal",
    "dog barking",
    "glass breaking",
    "smoke alarm",
    "doorbell",
]


def video_question(prompt: str, labels: list[str], duration_s: float, with_audio: bool) -> str:
    """What Omni is asked about the clip."""
    senses = "see and hear" if with_audio else "see"
    question = (
        f"This is a {duration_s:.1f} s home camera clip. Describe what you {senses}, in order, with the time in "
        f"seconds of each thing. Look for: {', '.join(labels)}."
    )
    return f"{question} {prompt}".strip()


def event_schema(labels: list[str]) -> dict[str, Any]:
    """JSON schema for the events answer (used for constrained decoding and by remote servers).

    Without labels no event can be named: the list must stay empty (never an empty enum).
    """
    if not labels:
        return {
            "type": "object",
            "properties": {"events": {"type": "array", "maxItems": 0}},
            "required": ["events"],
        }
    return {
        "type": "object",
        "properties": {
            "events": {
                "type": "array",
                "maxItems": 10,
                "items": {
                    "type": "object",
                    "properties": {
                        "label": {"type": "string", "enum": labels},
                        "confidence": {"type": "number"},
                        "start_s": {"type": "number"},
                        "end_s": {"type": "number"},
                        "description": {"type": "string", "maxLength": 200},
                    },
                    "required": ["label", "confidence", "start_s", "end_s", "description"],
                },
            }
        },
        "required": ["events"],
    }


def event_prompt(summary: str, labels: list[str], duration_s: float) -> list[ChatMessage]:
    """Messages that turn a clip description into events."""
    return [
        ChatMessage(
            "system",
            "You extract events from a description of a home camera clip. Answer only with JSON: "
            '{"events": [{"label", "confidence" (0..1), "start_s", "end_s", "description"}]}. '
            f"Labels allowed: {json.dumps(labels)}. The clip lasts {duration_s:.1f} s. No event: an empty list.",
        ),
        ChatMessage("user", summary or "(no description)"),
    ]


def parse_events(text: str, labels: list[str], duration_s: float) -> list[dict[str, Any]]:
    """Validate the model's JSON; raise ValueError saying what is wrong."""
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON object in the answer")
    try:
        data = json.loads(text[start : text.rfind("}") + 1])
    except json.JSONDecodeError as err:
        raise ValueError(f"invalid JSON: {err.msg}") from err
    if not isinstance(data, dict) or not isinstance(data.get("events"), list):
        raise ValueError("the answer has no events list")
    events: list[dict[str, Any]] = []
    allowed = {label.lower(): label for label in labels}
    slack = 0.5
    for item in data["events"]:
        if not isinstance(item, dict):
            raise ValueError("an event is not an object")
        label = allowed.get(str(item.get("label", "")).lower())
        if label is None:
            raise ValueError(f"label {item.get('label')!r} was not asked for")
        try:
            confidence = float(item["confidence"])
            start_s = float(item["start_s"])
            end_s = float(item["end_s"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"event {label!r} lacks a number: {err}") from err
        if not 0.0 <= confidence <= 1.0:
            raise ValueError(f"confidence {confidence} is outside 0..1")
        if not (0.0 <= start_s <= end_s <= duration_s + slack):
            raise ValueError(f"times {start_s}..{end_s} are outside the {duration_s:.1f} s clip")
        events.append(
            {
                "label": label,
                "confidence": round(confidence, 3),
                "start_s": round(start_s, 2),
                "end_s": round(min(end_s, duration_s), 2),
                "description": str(item.get("description", ""))[:200],
            }
        )
    return events
