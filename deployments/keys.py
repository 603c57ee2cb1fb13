"""API key storage: the key file of a state directory, and the records in it.

Keys live in ``STATE_DIR/api-keys.json`` (mode 600) as SHA-256 hashes only;
``corral keys create`` shows a key once and never stores it. A key is 32
random bytes, so a fast hash is as safe as a slow one: there is nothing to
guess a dictionary from. Writes are atomic (a temporary file renamed over the
old one) and locked, so two ``corral keys`` commands at once lose nothing.

Who may call what with a key is ``deployments/auth.py``'s business; this
module only reads and writes the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nodes.models import normalize_name

KEYS_FILE = "api-keys.json"
KEY_PREFIX = "corral-"


class KeyFileError(Exception):
    """The key file cannot be read or written; the message says which file and why."""


def keys_path(state_dir: Path) -> Path:
    """The key file of the state directory ``state_dir``."""
    return state_dir / KEYS_FILE


def hash_key(key: str) -> str:
    """What the file stores of ``key``: ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One key as stored: never the key itself, only its hash."""

    id: str
    name: str
    hash: str
    created_at: str
    models: tuple[str, ...] | None = None  # None: every model, and the model library
    revoked_at: str | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["models"] = list(self.models) if self.models is not None else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ApiKey:
        models = data.get("models")
        return cls(
            id=str(data["id"]),
            name=str(data.get("name") or ""),
            hash=str(data["hash"]),
            created_at=str(data.get("created_at") or ""),
            models=tuple(str(m) for m in models) if models is not None else None,
            revoked_at=data.get("revoked_at"),
        )


class KeyFile:
    """The key file of one state directory: read, create, revoke (atomic, locked)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> list[ApiKey]:
        """Every key, revoked ones included; [] if there is no file."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise KeyFileError(f"cannot read {self.path}: {exc.strerror}") from None
        try:
            doc = json.loads(text)
            return [ApiKey.from_json(k) for k in doc["keys"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise KeyFileError(
                f"{self.path} is damaged ({exc}); restore it, or remove it and create new keys"
            ) from None

    def create(self, name: str = "", models: Sequence[str] | None = None) -> tuple[ApiKey, str]:
        """A new key: its record, and the key itself (shown once, never stored)."""
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        with self._locked():
            keys = self.read()
            taken = {k.id for k in keys}
            key_id = _new_id(taken)
            record = ApiKey(
                id=key_id,
                name=name or key_id,
                hash=hash_key(secret),
                created_at=_now(),
                models=tuple(dict.fromkeys(normalize_name(m) for m in models))
                if models is not None
                else None,
            )
            self._write([*keys, record])
        return record, secret

    def revoke(self, which: str) -> ApiKey:
        """Revoke the key whose id or name is ``which``; KeyError if none, ValueError if the
        name is ambiguous."""
        with self._locked():
            keys = self.read()
            matches = [k for k in keys if k.id == which] or [k for k in keys if k.name == which]
            if not matches:
                raise KeyError(which)
            if len(matches) > 1:
                ids = ", ".join(k.id for k in matches)
                raise ValueError(f"{len(matches)} keys are named {which!r} ({ids}); give the id")
            target = matches[0]
            if target.revoked:
                return target
            revoked = ApiKey(**{**asdict(target), "revoked_at": _now()})
            self._write([revoked if k.id == target.id else k for k in keys])
        return revoked

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time (two `corral keys` commands at once)."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write(self, keys: list[ApiKey]) -> None:
        body = json.dumps({"version": 1, "keys": [k.to_json() for k in keys]}, indent=2) + "\n"
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "w") as f:  # mkstemp: mode 600
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def _new_id(taken: set[str]) -> str:
    while (key_id := "key-" + secrets.token_hex(4)) in taken:
        pass
    return key_id


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
