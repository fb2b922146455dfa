"""Whether a process runs, the one check used by the embedded Redis's
owner, the tests and the demo."""


def alive(pid):
    """True while `pid` runs (a zombie counts as gone)."""
    try:
        with open('/proc/%d/stat' % pid) as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except (OSError, TypeError, IndexError):
        return False
