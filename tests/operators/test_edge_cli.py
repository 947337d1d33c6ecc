"""``gpuq task list --cursor`` with a hostile cursor: one clear line, never a traceback (issue 11, item 7)."""

from __future__ import annotations

import base64


def test_a_deeply_nested_cursor_is_a_clear_error(gpuq):
    assert gpuq("db", "init").exit_code == 0
    nested = base64.urlsafe_b64encode(b"[" * 5000).decode().rstrip("=")
    for cursor in (nested, base64.urlsafe_b64encode(b"[" * 300).decode()):
        res = gpuq("task", "list", "--cursor", cursor)
        assert res.exit_code == 2, res
        assert "cursor" in res.stderr and "Traceback" not in res.stderr + res.stdout, res
