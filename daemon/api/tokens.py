"""API tokens kept by the daemon itself, next to the `[[api.tokens]]` of the configuration.

First-run access follows the convention of Frigate and Grafana: when neither the configuration nor this store
holds a token, the first start of the daemon creates an admin token, prints it once in the log with how to use it,
and keeps only its SHA-256. Operators add, list and revoke tokens with `anomalyd tokens create|list|revoke`.

The store is a small JSON file (`[api].tokens_file`; by default `api_tokens.json` in the folder holding
`[storage].dir`, i.e. `var/` for the shipped config), written atomically with mode 0600. The HTTP layer reads it again whenever the file
changes, so a token created or revoked from the command line works (or stops working) without a restart. Only
digests are stored; a lost token cannot be recovered, only replaced.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import tempfile
import threading
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger("anomalyd.tokens")

ROLES = ("viewer", "operator", "admin")
DEFAULT_TOKENS_NAME = "api_tokens.json"
BOOTSTRAP_NAME = "admin"


class TokenError(ValueError):
    """A bad token name or role, or a name that exists already / does not exist."""


@dataclass(frozen=True)
class StoredToken:
    name: str
    role: str
    token_sha256: str
    created_at: str
    created_by: str = ""

    def matches(self, presented: str) -> bool:
        """Constant-time comparison of a presented bearer token with this one's digest."""
        return hmac.compare_digest(hashlib.sha256(presented.encode()).hexdigest(), self.token_sha256)


def new_token() -> str:
    return "adt_" + secrets.token_urlsafe(32)


class TokenStore:
    """The JSON token file; reads are cached on the file's mtime and size."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._cached: tuple[tuple[int, int] | None, list[StoredToken]] = (None, [])

    def _stamp(self) -> tuple[int, int] | None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def tokens(self) -> list[StoredToken]:
        stamp = self._stamp()
        with self._lock:
            if stamp is not None and stamp == self._cached[0]:
                return self._cached[1]
            tokens = self._read() if stamp is not None else []
            self._cached = (stamp, tokens)
            return tokens

    def _read(self) -> list[StoredToken]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return [StoredToken(**item) for item in data.get("tokens", [])]
        except (OSError, ValueError, TypeError) as exc:
            # A damaged file grants nothing (and says so) rather than stopping the API.
            log.error("API token file %s is unreadable (%s): its tokens are not accepted", self.path, exc)
            return []

    def _write(self, tokens: list[StoredToken]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"tokens": [asdict(token) for token in tokens]}, indent=2)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".api_tokens.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(payload + "\n")
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def create(self, name: str, role: str, *, created_by: str = "") -> tuple[str, StoredToken]:
        """A new token (returned in clear once) with `name` and `role`; only its digest is stored."""
        if role not in ROLES:
            raise TokenError(f"role {role!r}: expected one of {', '.join(ROLES)}")
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            raise TokenError(f"token name {name!r}: use letters, digits, '-', '_' or '.'")
        with _file_lock(self.path):
            tokens = self._read() if self.path.exists() else []
            if any(token.name == name for token in tokens):
                raise TokenError(f"a token named {name!r} exists already (revoke it first)")
            secret = new_token()
            entry = StoredToken(name=name, role=role, token_sha256=hashlib.sha256(secret.encode()).hexdigest(),
                                created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                created_by=created_by)
            self._write([*tokens, entry])
        return secret, entry

    def revoke(self, name: str) -> StoredToken:
        with _file_lock(self.path):
            tokens = self._read() if self.path.exists() else []
            found = next((token for token in tokens if token.name == name), None)
            if found is None:
                raise TokenError(f"no stored token named {name!r}")
            self._write([token for token in tokens if token.name != name])
        return found


@contextlib.contextmanager
def _file_lock(path: Path):
    """Serialise writers (a CLI command next to the daemon's first start) with a lock file beside the store."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_STORES: dict[Path, TokenStore] = {}
_STORES_LOCK = threading.Lock()


def tokens_file(settings: Any) -> Path:
    """`[api].tokens_file`, or by default `api_tokens.json` in the folder that holds `[storage].dir` (`var/` for
    the shipped config: the daemon's writable state, like the SQLite database)."""
    value = getattr(getattr(settings, "api", None), "tokens_file", None)
    if value:
        return settings.resolve(value)
    return settings.resolve(settings.storage.dir).parent / DEFAULT_TOKENS_NAME


def store_for(settings: Any) -> TokenStore:
    """One store per file in this process (its read cache is shared by every request)."""
    path = tokens_file(settings)
    with _STORES_LOCK:
        return _STORES.setdefault(path, TokenStore(path))


def stored_tokens(settings: Any) -> list[StoredToken]:
    if not hasattr(settings, "resolve"):  # a bare test double without a config file: no store
        return []
    return store_for(settings).tokens()


def bootstrap_admin_token(settings: Any, port: int | None = None) -> str | None:
    """On a first start with no token anywhere: create the admin token and log it once. Returns it (or None)."""
    if getattr(settings.api, "tokens", None) or not getattr(settings.api, "enabled", True):
        return None
    store = store_for(settings)
    if store.path.exists():  # tokens were created (or all revoked) before: never a second bootstrap
        return None
    try:
        secret, entry = store.create(BOOTSTRAP_NAME, "admin", created_by="first start")
    except TokenError:  # another process created it first
        return None
    host, configured_port = settings.api.host_port
    port = port or configured_port
    bar = "=" * 78
    log.warning(
        "\n%s\nNo API token was configured, so this first start created the admin token %r.\n"
        "It is shown this once (only its SHA-256 is kept, in %s):\n\n    %s\n\n"
        "Log in to the UI at http://%s:%s/ with it, or send it as the header\n"
        "    Authorization: Bearer <token>\n"
        "More tokens: anomalyd tokens create NAME --role viewer|operator|admin; "
        "anomalyd tokens list; anomalyd tokens revoke NAME\n%s",
        bar, entry.name, store.path, secret, host if ":" not in host else f"[{host}]", port, bar)
    return secret
