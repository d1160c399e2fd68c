"""What a URL may show on an open endpoint or in a log: its scheme, host and port, never credentials, a path or a
query (Slack, Discord and Teams webhooks carry their secret in the path; databases and brokers in the userinfo)."""

from __future__ import annotations

from urllib.parse import urlsplit


def url_origin(url: str) -> str:
    """`https://user:pw@hooks.slack.com/services/T/B/secret?x=1` → `https://hooks.slack.com`."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:  # a malformed port or bracket: show nothing of it rather than the raw text
        return "<unparsable url>"
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    origin = f"{parts.scheme}://{host}" if parts.scheme else host
    return f"{origin}:{port}" if port is not None else origin
