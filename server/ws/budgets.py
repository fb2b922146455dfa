"""A stream's byte budgets (docs/limits.md), in decoded bytes: what one
activation may buffer between checkpoints (`max_buffer_size_in_bytes`),
what one checkpoint's state files may hold
(`max_checkpoint_size_in_bytes`) and what a stream may commit in all
(`max_stream_size_in_bytes`, frames and states of every chunk). Past
one a request gets 413 and nothing of it stays on the disk: the decoding
stops at the budget (web.Budget) and the append is undone.
Counted from the sizes Redis keeps (the buffer's per file, the committed
total), so a retry that varies a byte is counted like any frame."""
from typing import Any

from server import threads
from server.web import TooLarge


def frame_room(config: Any, buffered: int) -> tuple[int, str]:
    """(bytes, why) a frame may still decode to, with `buffered` bytes in
    the stream's buffer; 413 if none. The stream's total is checked when
    the frame is recorded (stream_record.record_frame), against the
    committed bytes Redis keeps: over it, the append is cut back and
    `stream_full` answers."""
    buffer_left = config.max_buffer_size_in_bytes - buffered
    if buffer_left <= 0:
        raise TooLarge('the frames buffered since the last checkpoint '
                       'hold %d bytes, the limit (max_buffer_size_in_bytes): '
                       'checkpoint first' % buffered)
    return buffer_left, ('the limit of the frames buffered between '
                         'checkpoints, max_buffer_size_in_bytes')


def stream_full(config: Any, held: int) -> None:
    """413: a stream holding `held` bytes (committed and buffered) takes
    no frame that would pass its total."""
    raise TooLarge('the stream holds %d bytes and a frame would pass its '
                   'limit (max_stream_size_in_bytes, %d): it takes no more '
                   'frames' % (held, config.max_stream_size_in_bytes))


def checkpoint_room(config: Any) -> tuple[int, str]:
    """(bytes, why) a checkpoint's state files may decode to."""
    return (config.max_checkpoint_size_in_bytes,
            'the limit per checkpoint, max_checkpoint_size_in_bytes')


async def committed(app: Any, held: Any, seq: int | None, state: int) -> int:
    """The stream's committed bytes after the checkpoint of `held` made
    chunk `seq` (None: its buffer was committed already, by a request whose
    record was lost) with `state` decoded bytes of files: counted on, or
    read from the disk when Redis does not know them."""
    if seq is not None and held.committed_bytes is not None:
        return int(held.committed_bytes + sum(held.sizes.values()) + state)
    found: int = await threads.disk(app.storage.committed_bytes, held.sid)
    return found
