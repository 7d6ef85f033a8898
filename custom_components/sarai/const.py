"""Constants for SARAi."""

from __future__ import annotations

import logging

DOMAIN = "sarai"
LOGGER = logging.getLogger(__package__)

CONF_GGUF_MODEL = "gguf_model"
CONF_MMPROJ_MODEL = "mmproj_model"
CONF_OMNI_MODEL = "omni_model"
CONF_MEMORY_BUDGET_MB = "memory_budget_mb"
CONF_SOLAR_URL = "solar_url"
CONF_SOLAR_API_KEY = "solar_api_key"
CONF_PLACEMENT = "placement"
CONF_SERVER_URL = "server_url"
CONF_SERVER_API_KEY = "server_api_key"

# Where the local model runs.
PLACEMENT_IN_PROCESS = "in_process"  # in Home Assistant's process
PLACEMENT_WORKER = "worker"  # SARAi's engine server as a supervised child process on 127.0.0.1
PLACEMENT_SERVER = "server"  # an OpenAI-compatible server: SARAi's add-on, llama-server, vLLM
# The menu order: the worker first, the recommended default for a Home Assistant Core install (README,
# "Where the model runs": crash isolation costs less than the goal the benchmarks check).
PLACEMENTS = (PLACEMENT_WORKER, PLACEMENT_IN_PROCESS, PLACEMENT_SERVER)
# Installed on demand for the in_process and worker placements (not in manifest.json: it is a source
# package that cannot build on Home Assistant OS / Container, where the server placement is the way).
LLAMA_CPP_REQUIREMENT = "llama-cpp-python==0.3.36"
# Installed on demand too when an Omni checkpoint (omni_model) is configured for those placements: PyTorch is
# large and has no musl wheels, so it is never in manifest.json. Pinned to the versions the project tests
# (requirements_test.txt, the add-on's requirements_torch.txt / requirements_omni.txt; a test checks them):
# the Omni API SARAi uses changes between transformers releases, and torchvision must match torch (the
# Qwen2.5-Omni processor's video part imports it). Home Assistant pins none of them.
OMNI_REQUIREMENTS = ("torch==2.15.0", "torchvision==0.29.2", "transformers==5.24.0")

CONF_PROMPT = "prompt"
CONF_TEMPERATURE = "temperature"
CONF_MAX_TOKENS = "max_tokens"
CONF_CONTEXT_SIZE = "context_size"
CONF_WARMUP = "warmup"
CONF_IDLE_UNLOAD_MINUTES = "idle_unload_minutes"
CONF_ROUTING_MODE = "routing_mode"
CONF_VOICE = "voice"
CONF_LLM_HASS_API = "llm_hass_api"
CONF_SOLAR_TIMEOUT = "solar_timeout"
CONF_OMNI_INT8 = "omni_int8"
CONF_HISTORY_TURNS = "history_turns"
CONF_THREADS = "threads"

DEFAULT_MEMORY_BUDGET_MB = 12000
DEFAULT_PROMPT = (
    "Eres SARAi, el asistente privado del hogar. Responde breve y en el idioma del usuario. "
    "You are SARAi, the household's private assistant: answer briefly, in the user's language."
)
DEFAULT_TEMPERATURE = 0.7
DEFAULT_AI_TASK_TEMPERATURE = 0.2
DEFAULT_MAX_TOKENS = 256
DEFAULT_CONTEXT_SIZE = 8192
DEFAULT_WARMUP = False
DEFAULT_IDLE_UNLOAD_MINUTES = 0
DEFAULT_VOICE = "Chelsie"
DEFAULT_SOLAR_TIMEOUT = 30
DEFAULT_HISTORY_TURNS = 20
VOICES = ["Chelsie", "Ethan"]
ROUTING_MODES = ["auto", "local", "remote"]

MAX_TOOL_ITERATIONS = 10
STT_MAX_SECONDS = 60
# Languages Qwen2.5-Omni handles well in speech and text (es and en first for our household).
LANGUAGES = ["es", "en", "zh", "fr", "de", "it", "pt", "ja", "ko", "ru"]

# Sub-entries: assistants (conversation, AI Task) and camera analyses.
SUBENTRY_CONVERSATION = "conversation"
SUBENTRY_AI_TASK = "ai_task_data"
SUBENTRY_CAMERA = "camera"
DEFAULT_CONVERSATION_NAME = "SARAi"
DEFAULT_AI_TASK_NAME = "SARAi AI Task"
# What each assistant sub-entry holds; the entry itself holds the engine (files, budget, SOLAR, options).
# routing_mode is in both: the entry's is the default for work no assistant asked for (video events).
AGENT_OPTION_KEYS = (
    "prompt",
    "llm_hass_api",
    "temperature",
    "max_tokens",
    "routing_mode",
    "history_turns",
)
TTS_MAX_CHARS = 1000  # longest text one TTS request may speak (a translated error beyond it)
CONF_CAMERA_ENTITY = "camera_entity"
CONF_SCAN_INTERVAL_MINUTES = "scan_interval_minutes"
MIN_SCAN_INTERVAL_MINUTES = 1
DEFAULT_CAMERA_PROMPTS = {
    "en": "Is there a person at the door? Answer yes or no, then say what you see.",
    "es": "¿Hay alguien en la puerta? Responde sí o no y después di lo que ves.",
}
DEFAULT_CAMERA_PROMPT = DEFAULT_CAMERA_PROMPTS["en"]

EVENT_IMAGE_ANALYZED = f"{DOMAIN}_image_analyzed"
EVENT_VIDEO_EVENT = f"{DOMAIN}_video_event"
EVENT_VIDEO_ANALYZED = f"{DOMAIN}_video_analyzed"
EVENT_ROUTE = f"{DOMAIN}_route"
SERVICE_ANALYZE_VIDEO = "analyze_video"
