"""AI Task: generate text or structured data, with camera snapshots and images (or clips) attached."""

from __future__ import annotations

import json
from pathlib import Path

from homeassistant.components import ai_task, conversation
from homeassistant.config_entries import ConfigSubentry
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError, ServiceValidationError
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback
import probatio as vol

from . import SaraiConfigEntry
from .const import DOMAIN, LOGGER, SUBENTRY_AI_TASK
from .engine.errors import EngineError, InvalidInput
from .engine.files import read_regular, resolve_regular
from .engine.grammar import safe_schema
from .entity import SaraiLLMEntity, to_json_schema
from .errors import to_ha_error

PARALLEL_UPDATES = 0
MAX_ATTACHMENT_BYTES = 20 * 1024 * 1024


async def async_setup_entry(
    hass: HomeAssistant, entry: SaraiConfigEntry, async_add_entities: AddConfigEntryEntitiesCallback
) -> None:
    """Add one AI Task entity per ai_task_data sub-entry."""
    for subentry in entry.subentries.values():
        if subentry.subentry_type == SUBENTRY_AI_TASK:
            async_add_entities([SaraiAITaskEntity(entry, subentry)], config_subentry_id=subentry.subentry_id)


def _read(path: Path) -> bytes:
    """An attachment's bytes: a regular file only (no FIFO, device or directory), at most 20 MB."""
    try:
        return read_regular(path, MAX_ATTACHMENT_BYTES)
    except InvalidInput as err:
        if err.translation_key == "file_too_large":
            raise InvalidInput(str(err), key="attachment_too_large", path=path) from err
        raise


class SaraiAITaskEntity(ai_task.AITaskEntity, SaraiLLMEntity):
    """SARAi AI Task: images and clips are seen by Omni, answers structured by the text model."""

    _attr_supported_features = (
        ai_task.AITaskEntityFeature.GENERATE_DATA | ai_task.AITaskEntityFeature.SUPPORT_ATTACHMENTS
    )

    def __init__(self, entry: SaraiConfigEntry, subentry: ConfigSubentry) -> None:
        """Create the AI Task entity of one sub-entry."""
        SaraiLLMEntity.__init__(self, entry, subentry, "AI Task")

    async def _describe_attachments(self, task: ai_task.GenDataTask) -> list[str]:
        descriptions: list[str] = []
        for attachment in task.attachments or []:
            mime = attachment.mime_type or ""
            try:
                if mime.startswith("image/"):
                    data = await self.hass.async_add_executor_job(_read, attachment.path)
                    descriptions.append(await self.engine.describe_image(data, task.instructions))
                elif mime.startswith("video/"):
                    path = await self.hass.async_add_executor_job(resolve_regular, attachment.path)
                    result = await self.engine.analyze_clip(path, prompt=task.instructions)
                    descriptions.append(str(result["summary"]))
                else:
                    raise ServiceValidationError(
                        translation_domain=DOMAIN,
                        translation_key="unsupported_attachment",
                        translation_placeholders={"mime_type": mime or "unknown"},
                    )
            except EngineError as err:
                raise to_ha_error(err) from err
        return descriptions

    async def _async_generate_data(
        self, task: ai_task.GenDataTask, chat_log: conversation.ChatLog
    ) -> ai_task.GenDataTaskResult:
        """Describe the attachments, then answer (as JSON matching ``task.structure`` when given).

        A structure no grammar can satisfy is refused first, before any attachment is looked at.
        """
        schema = to_json_schema(task.structure) if task.structure else None
        if schema is not None:
            try:
                schema = safe_schema(schema)
            except EngineError as err:
                raise to_ha_error(err) from err
        descriptions = await self._describe_attachments(task)
        if descriptions and not task.structure and len(descriptions) == 1:
            chat_log.async_add_assistant_content_without_tools(
                conversation.AssistantContent(agent_id=self.entity_id, content=descriptions[0])
            )
            return ai_task.GenDataTaskResult(conversation_id=chat_log.conversation_id, data=descriptions[0])
        context = None
        if descriptions:
            context = "What the attachments show:\n" + "\n".join(
                f"{i + 1}. {text}" for i, text in enumerate(descriptions)
            )
        if schema is not None:
            context = (context + "\n\n" if context else "") + "Answer only with JSON matching: " + json.dumps(schema)
        for attempt in (1, 2):
            await self.async_handle_chat_log(chat_log, json_schema=schema, extra_context=context)
            last = chat_log.content[-1]
            text = last.content if isinstance(last, conversation.AssistantContent) else None
            if schema is None:
                return ai_task.GenDataTaskResult(conversation_id=chat_log.conversation_id, data=text or "")
            try:
                data = json.loads(text or "")
                task.structure(data)  # type: ignore[misc]  # checked above: schema is set
            except (ValueError, TypeError, vol.Invalid) as err:
                LOGGER.warning("AI Task answer is not valid JSON for the structure (attempt %d): %s", attempt, err)
                chat_log.async_add_user_content(
                    conversation.UserContent(f"That was not valid ({err}). Answer again with the JSON only.")
                )
                continue
            return ai_task.GenDataTaskResult(conversation_id=chat_log.conversation_id, data=data)
        raise HomeAssistantError(translation_domain=DOMAIN, translation_key="json_parse_error")
