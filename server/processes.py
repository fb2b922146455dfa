"""Processes as /proc shows them: the one place the embedded Redis's
owner, the lease, chaos, the demo and the tests look them up."""
from __future__ import annotations

import os

PARENT, GROUP = 1, 2  # fields of stat() after the state


def stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state,
    parent, process group, ...), or None once the process is gone."""
    try:
        with open('/proc/%s/stat' % pid) as f:
            return f.read().rsplit(')', 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int | None) -> bool:
    """True while `pid` runs (a zombie counts as gone)."""
    fields = stat(pid) if pid is not None else None
    return fields is not None and fields[0] != 'Z'


def live_pids(field: int, value: int) -> list[int]:
    """Live pids whose stat `field` (PARENT or GROUP) is `value`."""
    found = []
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            fields = stat(entry)
            if fields and fields[0] != 'Z' and int(fields[field]) == value:
                found.append(int(entry))
    return found
