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


def frame_room(config: Any, held: Any) -> tuple[int, str]:
    """(bytes, why) a frame of `held` (a stream_record.Held) may still
    decode to; 413 if none."""
    buffered = sum(held.sizes.values())
    buffer_left = config.max_buffer_size_in_bytes - buffered
    if buffer_left <= 0:
        raise TooLarge('the frames buffered since the last checkpoint '
                       'hold %d bytes, the limit (max_buffer_size_in_bytes): '
                       'checkpoint first' % buffered)
    stream_left = (config.max_stream_size_in_bytes - buffered
                   - (held.committed_bytes or 0))
    if stream_left <= 0:
        raise TooLarge('the stream holds %d bytes, its limit '
                       '(max_stream_size_in_bytes): it takes no more frames'
                       % (buffered + (held.committed_bytes or 0)))
    if stream_left < buffer_left:
        return stream_left, "the stream's limit, max_stream_size_in_bytes"
    return buffer_left, ('the limit of the frames buffered between '
                         'checkpoints, max_buffer_size_in_bytes')


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
