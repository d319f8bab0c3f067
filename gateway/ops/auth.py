"""Operator tokens: who is calling the API, and in which role.

The tokens file (TOML) holds only each token's SHA-256, never the token::

    [tokens.alice]
    role = "operator"
    sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"

A token is 32 random bytes (``fk_`` + URL-safe base64), so a plain hash is enough: there is nothing to
guess a dictionary from. ``feikong token add NAME --role ROLE --file F`` makes one, writes its hash and
prints the token once. The file is re-read when it changes, so a token added or removed counts without a
restart.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import tomllib
from dataclasses import dataclass
from pathlib import Path

from gateway.core.control import ROLES

_TOKEN = re.compile(r"fk_[A-Za-z0-9_-]{16,}")
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
PREFIX = "fk_"
log = logging.getLogger(__name__)


class TokenFileError(ValueError):
    """The tokens file is not as it should be: the message names the entry and the key."""


@dataclass(frozen=True)
class Identity:
    name: str
    role: str

    def at_least(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def redact(text: str) -> str:
    """Anything shaped like a token masked (one pasted into a URL or a field by mistake)."""
    return _TOKEN.sub(PREFIX + "***", text)


class RedactTokens(logging.Filter):
    """On a logger: token-shaped text masked in its records: the message with its arguments of any type (an
    exception's repr included), the traceback and the stack. The record is rendered here, once, so every
    handler and formatter after this sees only the masked text."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: leave it for the handler to report, but mask what is shown
            message = f"{record.msg} {record.args}"
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def mask_tokens_on_handlers(logger: logging.Logger | None = None) -> None:
    """Every handler of ``logger`` (the root by default) masks tokens in whatever reaches it, from any
    logger below (a filter on a handler sees propagated records; one on a logger would not)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactTokens) for f in handler.filters):
            handler.addFilter(RedactTokens())


class Tokens:
    def __init__(self, entries: dict[str, tuple[str, str]] | None = None, path: Path | None = None) -> None:
        """``entries``: name -> (role, sha256 hex)."""
        self._entries = dict(entries or {})
        self.path = path
        self._stamp = self._file_stamp()

    # -- the file --------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokens":
        path = Path(path)
        return cls(_parse(path), path)

    def _file_stamp(self):
        if self.path is None:
            return None
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _refresh(self) -> None:
        """The file again if it changed. One that is gone or broken refuses every token until it is fixed
        (keeping the old entries would keep a token someone just removed)."""
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self._entries = _parse(self.path) if stamp is not None else {}
        except TokenFileError as exc:
            log.error("%s; every token is refused until the file is fixed", exc)
            self._entries = {}
        if stamp is None:
            log.error("tokens file %s is gone; every token is refused", self.path)

    def add(self, name: str, role: str) -> str:
        """A new token for ``name`` (replacing any it had), saved to the file; returns the token (shown once)."""
        _check(name, role, "0" * 64, "the new token")
        twin = _case_twin(name, self._entries)
        if twin:
            raise TokenFileError(f"the name {name!r} differs from the existing {twin!r} only in case; "
                                 f"use that name or another")
        token = new_token()
        self._entries[name] = (role, token_hash(token))
        self.save()
        return token

    def remove(self, name: str) -> None:
        if name not in self._entries:
            raise KeyError(f"no token named {name!r}")
        del self._entries[name]
        self.save()

    def save(self) -> None:
        if self.path is None:
            raise TokenFileError("these tokens have no file")
        lines = ["# feikong operator tokens: only their SHA-256 is kept here (feikong token add NAME --role ROLE)", ""]
        for name, (role, digest) in sorted(self._entries.items()):
            lines += [f'[tokens."{name}"]', f'role = "{role}"', f'sha256 = "{digest}"', ""]
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines))
        os.replace(tmp, self.path)
        self._stamp = self._file_stamp()

    # -- lookups ---------------------------------------------------------------------------------------
    def names(self) -> dict[str, str]:
        """name -> role."""
        self._refresh()
        return {n: r for n, (r, _) in self._entries.items()}

    def identify(self, token: str) -> Identity | None:
        """Who holds this token, or None."""
        self._refresh()
        digest = token_hash(token)
        found = None
        for name, (role, expected) in self._entries.items():
            if hmac.compare_digest(digest, expected):  # every entry compared: no early exit to time
                found = Identity(name, role)
        return found


def _check(name: str, role: str, digest: str, where: str) -> None:
    if not _NAME.match(name):
        raise TokenFileError(f"{where}: name {name!r} must be 1-64 of letters, digits and _ . @ -")
    if role not in ROLES:
        raise TokenFileError(f"{where}: role {role!r}; allowed: {', '.join(ROLES)}")
    if not _HEX64.match(digest):
        raise TokenFileError(f"{where}: sha256 must be 64 lowercase hex digits")


def _case_twin(name: str, names) -> str | None:
    """Another of ``names`` that differs from ``name`` only in case: names are people, and the two-person rule
    compares them casefolded, so such a pair would pass for one person twice."""
    return next((n for n in names if n != name and n.casefold() == name.casefold()), None)


def _parse(path: Path) -> dict[str, tuple[str, str]]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise TokenFileError(f"{path}: no such tokens file (make one with `feikong token add`)") from None
    except tomllib.TOMLDecodeError as exc:
        raise TokenFileError(f"{path}: not valid TOML: {exc}") from None
    unknown = set(data) - {"tokens"}
    if unknown:
        raise TokenFileError(f"{path}: unknown top-level key(s) {sorted(unknown)}; allowed: tokens")
    out = {}
    for name, entry in data.get("tokens", {}).items():
        where = f"{path}: tokens.{name}"
        if not isinstance(entry, dict):
            raise TokenFileError(f"{where}: must be a table with role and sha256")
        extra = set(entry) - {"role", "sha256"}
        if extra:
            raise TokenFileError(f"{where}: unknown key(s) {sorted(extra)}; allowed: role, sha256")
        role, digest = entry.get("role"), entry.get("sha256")
        if not isinstance(role, str) or not isinstance(digest, str):
            raise TokenFileError(f"{where}: role and sha256 are both required strings")
        _check(name, role, digest, where)
        twin = _case_twin(name, out)
        if twin:
            raise TokenFileError(f"{where}: differs from tokens.{twin} only in case: names are people, and "
                                 f"the two would pass for two people")
        out[name] = (role, digest)
    return out
