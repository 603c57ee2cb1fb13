"""Ollama's native API (``/api/...``): protocol types, serving logic, HTTP routes."""
