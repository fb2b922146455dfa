"""What the command center and the workservers agree on about activations
and the sessions they end in (the protocol: server/ws/sessions.py). Both
servers import these; neither writes them again."""
import time

# Activations one CC -> WS call may carry (the CC batches them under load;
# the WS refuses a longer list).
MAX_ACTIVATIONS = 64

# Per-minute counts are kept this long (older ones are dropped).
MINUTES_KEPT = 120

# Why a session ended, by the WS's mode of ending its activation.
REASON_OF_MODE: dict[str, str] = {
    'stop': 'stop', 'error': 'error', 'expire': 'expiry',
    'halt': 'manager_stop', 'delete': 'deletion', 'restart': 'ws_restart'}
REASONS: tuple[str, ...] = tuple(REASON_OF_MODE.values())

# The fields of one session record, as the WS reports it.
SESSION_FIELDS: tuple[str, ...] = (
    'id', 'donor', 'engine', 'core_version', 'target_id', 'stream_id',
    'start', 'end', 'reason', 'frames')


def minute(t: float | None = None) -> int:
    """The unix minute of `t` (default now): the key of per-minute counts."""
    return int((time.time() if t is None else t) // 60)
