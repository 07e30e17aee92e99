"""Serving: an OpenAI-compatible HTTP server (schemas, the app, its batching scheduler, transport)."""
