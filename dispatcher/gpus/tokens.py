"""Per-attempt callback tokens: ``<attempt>.<HMAC-SHA256(secret, task_id NUL attempt)>``.

A token names the attempt it was issued for, so a callback proves both which task and which attempt it
speaks for; a token leaked from one task or attempt is worth nothing for another. The secret never leaves
this module's callers and is never logged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re


def _mac(secret: bytes, task_id: str, attempt: int) -> str:
    digest = hmac.new(secret, f"{task_id}\x00{attempt}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def make_token(secret: bytes, task_id: str, attempt: int) -> str:
    return f"{attempt}.{_mac(secret, task_id, attempt)}"


#: ``<attempt>.<43 characters of unpadded URL-safe base64>``.
_SHAPE = re.compile(r"[0-9]{1,9}\.[A-Za-z0-9_-]{43}")


def token_shaped(token: str) -> bool:
    """Could this be a token of ours? Checked before a callback's body is read."""
    return _SHAPE.fullmatch(token) is not None


def verify_token(secret: bytes, task_id: str, token: str) -> int | None:
    """The attempt the token was issued for, or None when it is not ours (compared in constant time)."""
    head, sep, mac = token.partition(".")
    # isascii(): "²" passes isdigit() but not int() (a 500 per request before).
    if not sep or not head.isascii() or not head.isdigit() or len(head) > 9:
        return None
    attempt = int(head)
    if hmac.compare_digest(mac.encode(), _mac(secret, task_id, attempt).encode()):
        return attempt
    return None
