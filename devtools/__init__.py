"""Developer tools: tiny real models and media for tests, scripts/develop and scripts/bench."""
