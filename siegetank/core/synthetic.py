"""The synthetic engine: frames of a chosen size at a chosen rate, no
physics. For tests and benchmarks: it costs almost nothing per core, so
thousands of cores can run in one process."""
from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from typing import Any

NAME = 'synthetic'
VERSION = '1'
FRAME_FILE = 'frames.dat.b64'
STATE_FILE = 'state.xml.gz.b64'


def seed_files(label: str = 'seed') -> dict[str, bytes]:
    """The stream files a synthetic target's streams start from."""
    return {STATE_FILE: json.dumps({'frame': 0, 'seed': label}).encode()}


class Engine:
    """Frames of `frame_bytes` bytes, `rate` frames per second per core."""

    name = NAME
    version = VERSION

    def __init__(self, frame_bytes: int = 1024, rate: float = 1.0) -> None:
        if frame_bytes < 16 or rate <= 0:
            raise ValueError('frame_bytes must be >= 16 and rate > 0')
        self.frame_bytes = frame_bytes
        self.rate = rate

    def start(self, stream_files: Mapping[str, bytes],
              target_files: Mapping[str, bytes],
              options: Mapping[str, Any]) -> Run:
        return Run(self, stream_files, options)


class Run:
    """One stream's simulation: its state is the count of frames made."""

    def __init__(self, engine: Engine, stream_files: Mapping[str, bytes],
                 options: Mapping[str, Any]) -> None:
        self.engine = engine
        state = stream_files.get(STATE_FILE)
        try:
            self.frame = int(json.loads(state)['frame']) if state else 0
        except (ValueError, KeyError, TypeError):
            raise ValueError('synthetic: unreadable %s' % STATE_FILE) from None
        # Every frame differs (a repeated body is a retry to the WS).
        self.salt = os.urandom(8).hex()

    def next_frame(self, stop: threading.Event
                   ) -> tuple[dict[str, bytes], int] | None:
        """Wait one period (or until `stop` is set); return
        ({name: bytes}, frames) or None when stopped."""
        if stop.wait(1.0 / self.engine.rate):
            return None
        self.frame += 1
        head = ('frame %d %s\n' % (self.frame, self.salt)).encode()
        body = head + b'x' * max(0, self.engine.frame_bytes - len(head) - 1)
        return {FRAME_FILE: body[:self.engine.frame_bytes - 1] + b'\n'}, 1

    def checkpoint(self) -> dict[str, bytes]:
        return {STATE_FILE: json.dumps({'frame': self.frame}).encode()}

    def close(self) -> None:
        pass
