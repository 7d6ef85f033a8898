"""Which past turns of a conversation go into the prompt.

A turn is a user message with everything that answers it (assistant replies, tool calls, tool
results). The system prompt and the newest turn are always kept; the oldest whole turns are
dropped when the context (or the ``history_turns`` window) is full. Dropping is done in blocks:
once trimming is needed, old turns go until the rest fills only ``KEEP_RATIO`` of the room, so the
next turns share the same prompt prefix (llama.cpp's KV cache reuses it) instead of losing one
turn, and the whole cache after the system prompt, every turn.

The decision is a pure function of the turn sizes: it replays the conversation from its first
turn, so the same history always gives the same cut, with no state kept between requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate

from .types import ChatMessage

KEEP_RATIO = 0.5


def split_turns(messages: Sequence[ChatMessage]) -> tuple[list[ChatMessage], list[list[ChatMessage]]]:
    """(leading system messages, turns); messages before the first user message form a turn of their own."""
    head: list[ChatMessage] = []
    for msg in messages:
        if msg.role != "system":
            break
        head.append(msg)
    turns: list[list[ChatMessage]] = []
    for msg in messages[len(head) :]:
        if msg.role == "user" or not turns:
            turns.append([msg])
        else:
            turns[-1].append(msg)
    return head, turns


def first_kept_turn(sizes: Sequence[int], budget: int, max_past: int = 0, keep_ratio: float = KEEP_RATIO) -> int:
    """Index of the oldest turn to keep, given each turn's size (tokens) and the room for turns.

    ``max_past`` bounds the past turns kept besides the newest one (0: only the room bounds them).
    The newest turn is always kept, even when it alone exceeds ``budget`` (the caller decides whether
    it fits at all). For a history that grows by appending turns, the result never decreases and
    changes only when a block of turns is dropped.
    """
    if not sizes:
        return 0
    totals = [0, *accumulate(sizes)]
    low_budget = int(budget * keep_ratio)
    low_past = int(max_past * keep_ratio)
    start = 0
    for end in range(len(sizes)):
        past = end - start
        if totals[end + 1] - totals[start] <= budget and (max_past <= 0 or past <= max_past):
            continue
        first = end  # drop down to the low-water mark, keeping as many of the newest turns as fit
        while (
            first > start
            and totals[end + 1] - totals[first - 1] <= low_budget
            and (max_past <= 0 or end - (first - 1) <= low_past)
        ):
            first -= 1
        start = first
    return start


def window(messages: Sequence[ChatMessage], max_past: int) -> list[ChatMessage]:
    """The messages within the ``history_turns`` window (for servers that count tokens themselves)."""
    if max_past <= 0:
        return list(messages)
    head, turns = split_turns(messages)
    start = first_kept_turn([1] * len(turns), len(turns), max_past)
    return head + [msg for turn in turns[start:] for msg in turn]
