"""Where requests go and how they authenticate.

The base URL comes from :func:`set_base_path`, else ``LLM_ENGINE_BASE_PATH``, else
``http://127.0.0.1:5005/``; the API key from :func:`set_api_key`, else ``SCALE_API_KEY``.
Both are read when a request is made, never at import.
"""

from __future__ import annotations

import base64
import os
from urllib.parse import urljoin

DEFAULT_BASE_PATH = "http://127.0.0.1:5005/"
# Seconds, as the current official client waits: 300 for a completion (a long generation on a busy server
# takes minutes), 10 for everything else (listing and describing model endpoints).
COMPLETION_TIMEOUT: float = 300
DEFAULT_TIMEOUT: float = 10

_base_path: str | None = None
_api_key: str | None = None


def set_base_path(path: str | None) -> None:
    """Send requests to ``path`` (``None`` goes back to the environment / default)."""
    global _base_path
    _base_path = path


def set_api_key(key: str | None) -> None:
    """Authenticate with ``key``; ``""`` sends no auth, ``None`` goes back to ``SCALE_API_KEY``."""
    global _api_key
    _api_key = key


def get_base_path() -> str:
    """The base URL in effect, always ending in ``/``.

    The official client joins with ``urljoin``, which drops a last path segment that has no
    trailing slash; adding the slash keeps ``http://host/llm-engine`` meaning ``http://host/llm-engine/``.
    """
    base = _base_path or os.environ.get("LLM_ENGINE_BASE_PATH") or DEFAULT_BASE_PATH
    return base if base.endswith("/") else base + "/"


def get_api_key() -> str | None:
    """The API key in effect, or ``None`` when there is none (then no auth is sent)."""
    return _api_key if _api_key is not None else os.environ.get("SCALE_API_KEY") or None


def url_for(resource: str) -> str:
    """Absolute URL of a resource path such as ``v1/llm/model-endpoints``."""
    return urljoin(get_base_path(), resource.lstrip("/"))


def auth_headers() -> dict[str, str]:
    """Headers the official client sends: ``x-api-key`` plus HTTP Basic (key as user, empty password)."""
    key = get_api_key()
    if not key:
        return {}
    token = base64.b64encode(f"{key}:".encode()).decode("ascii")
    return {"x-api-key": key, "Authorization": f"Basic {token}"}
