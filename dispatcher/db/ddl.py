"""``sql/schema.sql``: the tables of ``dispatcher.db.schema`` rendered as MySQL DDL, for DBAs who create
the schema by hand or review it. The dispatcher itself creates it from the SQLAlchemy tables at start (as
``gpuq db init`` does); a test fails when the file and the tables drift apart.

Regenerate with ``make schema-sql`` (``python -m dispatcher.db.ddl sql/schema.sql``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from sqlalchemy.dialects import mysql
from sqlalchemy.schema import CreateIndex, CreateTable

from dispatcher.db.schema import SCHEMA_VERSION, metadata
from dispatcher.states import Outcome, TaskState

_HEADER = f"""\
-- gpuq schema version {SCHEMA_VERSION}, MySQL 8 / MariaDB 10.6+ (InnoDB). Generated from
-- dispatcher/db/schema.py by `make schema-sql`: edit that file, not this one.
--
-- tasks.state: {", ".join(s.value for s in TaskState)}.
--   processing = holds a slot (gpu_id, slot_index); finished / failed / cancelled are final;
--   retrying = waits for its backoff (run_after); scheduled = waits for its start time (run_after);
--   queued = back in Redis after a retry or schedule.
-- attempts.outcome: {", ".join(o.value for o in Outcome)}.
-- slots.task_id is UNIQUE and set exactly while a task runs there; the (gpu_id, slot_index) key caps a GPU's
-- running jobs at its slot rows.
"""


def render() -> str:
    dialect = mysql.dialect()
    parts = [_HEADER]
    for table in metadata.sorted_tables:
        parts.append(str(CreateTable(table).compile(dialect=dialect)).strip() + ";\n")
        for index in sorted(table.indexes, key=lambda i: str(i.name)):
            parts.append(str(CreateIndex(index).compile(dialect=dialect)).strip() + ";\n")
    text = "\n".join(parts)
    return "\n".join(line.rstrip().expandtabs(4) for line in text.splitlines()) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    text = render()
    if args:
        Path(args[0]).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
