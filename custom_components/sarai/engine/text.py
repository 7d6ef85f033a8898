"""Cleaning model output before anyone sees it: no special tokens, no control characters, no endless runs.

Every reply, local or remote, streamed or whole, goes through ``TextSanitizer`` (streamed) or
``sanitize_text`` (whole). It removes

- special-token text (``<|im_start|>``, ``<|audio_eos|>``, ``<|vision_end|>`` ...) and stray tool-call
  or tool-response tags (a parsed call never reaches it: the tool-call parser takes those first);
- control characters except newline and tab, lone surrogates and U+FFFD (what undecodable bytes become);

and, for prose (not JSON), breaks runs of more than ``MAX_RUN`` characters without whitespace with a
zero-width space so that a chat bubble can wrap them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
import logging
import re
import unicodedata

from .types import ChatDelta

_LOGGER = logging.getLogger(__name__)

MAX_RUN = 200
BREAK = "\u200b"  # zero-width space: a line-break opportunity that shows nothing
# <|anything|> (Qwen's and ChatML's control tokens) and the tags of Qwen's tool-call format.
MARKUP_RE = re.compile(r"<\|[^<>|\s]{0,40}\|>|</?(?:tool_call|tool_response|tools)>")
_TAGS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<tools>", "</tools>")
_PARTIAL_SPECIAL_RE = re.compile(r"<\|[^<>|\s]{0,40}\|?")


def _drop_char(ch: str) -> bool:
    if ch in "\n\t":
        return False
    if ch == "\ufffd":
        return True
    return unicodedata.category(ch) in ("Cc", "Cs")


def _strip_markup(text: str) -> str:
    while True:  # removing one marker may join the pieces of another: "<|im_<|x|>start|>"
        cleaned = MARKUP_RE.sub("", text)
        if cleaned == text:
            return text
        text = cleaned


def _maybe_markup_start(tail: str) -> bool:
    """Whether ``tail`` (from a "<" to the end of a chunk) may be the first part of a marker."""
    return bool(_PARTIAL_SPECIAL_RE.fullmatch(tail)) or any(tag.startswith(tail) for tag in _TAGS)


def _clean_chars(text: str) -> str:
    if text.isprintable() and "\ufffd" not in text:  # fast path (isprintable is False for \n and \t too)
        return text
    return "".join(ch for ch in text if not _drop_char(ch))


class TextSanitizer:
    """Streaming sanitizer: ``feed`` chunks, then ``finish``; markup split across chunks is still caught."""

    def __init__(self, *, break_runs: bool = True, max_run: int = MAX_RUN) -> None:
        """``break_runs``: insert a zero-width space into runs longer than ``max_run`` (off for JSON)."""
        self._break_runs = break_runs
        self._max_run = max_run
        self._pending = ""
        self._run = 0

    def feed(self, text: str) -> str:
        """Return what can be shown now; a possible partial marker at the end is held back."""
        buf = _strip_markup(self._pending + _clean_chars(text))
        cut = buf.rfind("<")
        if cut >= 0 and _maybe_markup_start(buf[cut:]):
            buf, self._pending = buf[:cut], buf[cut:]
        else:
            self._pending = ""
        return self._emit(buf)

    def finish(self) -> str:
        """Flush what was held back (a cut special token, ``<|...`` at the very end, is dropped)."""
        buf, self._pending = self._pending, ""
        return "" if buf.startswith("<|") else self._emit(buf)

    def _emit(self, text: str) -> str:
        if not self._break_runs or not text:
            return text
        out: list[str] = []
        run = self._run
        for ch in text:
            if ch.isspace() or ch == BREAK:
                run = 0
            elif run >= self._max_run:
                out.append(BREAK)
                run = 1
            else:
                run += 1
            out.append(ch)
        self._run = run
        return "".join(out)


def neutralize_special(text: str) -> str:
    """Text that a tokenizer parsing special tokens everywhere (transformers) reads as plain text: every
    ``<|`` gets an invisible word joiner, so ``<|im_start|>`` typed by a user is never a control token."""
    return text.replace("<|", "<\u2060|")


def sanitize_text(text: str, *, break_runs: bool = True) -> str:
    """Sanitize a whole text at once (media descriptions, transcripts)."""
    sanitizer = TextSanitizer(break_runs=break_runs)
    return sanitizer.feed(text) + sanitizer.finish()


def clean_delta(
    delta: ChatDelta, sanitizer: TextSanitizer, *, tools: bool = True, final: bool = False
) -> ChatDelta | None:
    """A delta with sanitized content (``final``: the last one, flush); tool calls dropped when no tools
    were offered; None when nothing is left."""
    content = sanitizer.feed(delta.content) if delta.content else ""
    if final:
        content += sanitizer.finish()
    calls = delta.tool_calls
    if calls and not tools:
        _LOGGER.debug("Dropped %d tool calls: no tools were offered", len(calls))
        calls = []
    return ChatDelta(content=content, tool_calls=calls) if content or calls else None


async def then_end[T](stream: AsyncIterator[T]) -> AsyncIterator[T | None]:
    """The stream's items, then ``None`` once it is exhausted (one place to flush parsers and sanitizers)."""
    async for item in stream:
        yield item
    yield None


SENTENCE_END = re.compile(r"(?<=[.!?¡¿;:\n])\s+")
MAX_SENTENCE_CHARS = 200  # the longest piece one talker call speaks


def split_sentences(buffer: str, final: bool) -> tuple[list[str], str]:
    """Complete sentences in ``buffer`` and the remainder; a sentence longer than MAX_SENTENCE_CHARS is split.

    Whatever the shape of the text (no punctuation, one huge word), each piece handed to the talker is bounded.
    """
    parts = SENTENCE_END.split(buffer)
    rest = "" if final else parts.pop()
    if not final and len(rest) > MAX_SENTENCE_CHARS:  # no sentence end in sight: cut at the last space
        cut = rest.rfind(" ", 0, MAX_SENTENCE_CHARS)
        cut = cut if cut > 0 else MAX_SENTENCE_CHARS
        parts.append(rest[:cut])
        rest = rest[cut:]
    sentences: list[str] = []
    for part in parts:
        part = part.strip()
        while len(part) > MAX_SENTENCE_CHARS:
            cut = part.rfind(" ", 0, MAX_SENTENCE_CHARS)
            cut = cut if cut > 0 else MAX_SENTENCE_CHARS
            sentences.append(part[:cut].strip())
            part = part[cut:].strip()
        if part:
            sentences.append(part)
    return sentences, rest
