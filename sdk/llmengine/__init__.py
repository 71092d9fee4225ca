"""Python client for the LLM Engine Completion API."""
