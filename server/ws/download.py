"""GET /streams/<stream_id>/<file>: a file's committed frames, streamed
from disk a chunk at a time, with one HTTP Range per request. The CC's
pass, or a URL the CC signed (server/signing.py), may download. Each
download logs the bytes it sent: what researchers' syncs cost."""
import logging
import os
import re
from typing import Any

from tornado.iostream import StreamClosedError

from server import signing, threads
from server.web import (
    APIError,
    APIHandler,
    Permission,
    allow,
    check_file_name,
    check_stream_id,
    role,
)
from server.ws import stream_record
from server.ws.cc_api import cc_named, cc_passes
from server.ws.streams import target_of

log = logging.getLogger('siegetank.ws.download')

# At most 18 digits a side: any file fits, and int() stays cheap.
RANGE = re.compile(r'bytes=([0-9]{0,18})-([0-9]{0,18})')
READ_SIZE = 1 << 20


def parse_range(header, total):
    """(start, end) inclusive, None for the whole file, or 'unsatisfiable'.
    One range only; a malformed header is ignored (RFC 9110)."""
    if not header:
        return None
    m = RANGE.fullmatch(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None
    if not m.group(1):  # the last n bytes
        n = int(m.group(2))
        if n == 0 or total == 0:
            return 'unsatisfiable'
        return max(total - n, 0), total - 1
    start = int(m.group(1))
    end = int(m.group(2)) if m.group(2) else total - 1
    if start >= total:
        return 'unsatisfiable'
    if end < start:
        return None
    return start, min(end, total - 1)


def plan_range(parts, start, end):
    """[(path, offset, length)] covering bytes [start, end] (inclusive) of
    the concatenation of `parts` [(path, size)]."""
    plan = []
    offset = 0
    for path, size in parts:
        lo = max(start - offset, 0)
        hi = min(end - offset, size - 1)
        if lo <= hi:
            plan.append((path, lo, hi - lo + 1))
        offset += size
    return plan


def read_at(f, offset, length):
    """`length` bytes at `offset` of the open file `f`."""
    return os.pread(f.fileno(), length, offset)


@role('signed_url', 'missing cc_pass or signed URL')
async def _signed(handler: Any, rule: Permission) -> str:
    """The command center that made the stream (its cc_pass) or a signed
    URL of it: the handler's `authenticate`."""
    await handler.authenticate()
    return 'signed'


class DownloadHandler(APIHandler):
    async def authenticate(self):
        """Names checked (400), then 401 unless the caller has a cc_pass or
        a valid signed URL; only the command center that made the stream
        (its pass, its key): another CC's pass is told 404."""
        stream_id, filename = self.path_args
        check_stream_id(stream_id)
        check_file_name(filename)
        config = self.config
        _, owner = await stream_record.target_and_owner(self.application,
                                                        stream_id)
        if owner:
            cc = config.command_centers.get(owner)
            passes = [cc['pass']] if cc else []
        else:  # unknown, or made before owners were kept
            passes = cc_passes(config)
        caller = cc_named(config, self.token())
        if caller is not None:
            if owner and caller != owner:
                raise APIError(404, 'unknown stream %s' % stream_id)
            return
        expires = self.get_query_argument('expires', None)
        sig = self.get_query_argument('signature', None)
        if expires is None and sig is None:
            raise APIError(401, 'missing cc_pass or signed URL')
        if not signing.valid(passes, stream_id, filename, expires, sig):
            raise APIError(401, 'bad or expired download signature')

    @allow('signed_url')
    async def get(self, stream_id, filename):
        await target_of(self.application, stream_id)
        parts = await threads.disk(self.application.storage.download_parts,
                                   stream_id, filename)
        if parts is None:
            raise APIError(404, 'stream %s has no file %s'
                           % (stream_id, filename))
        total = sum(size for _, size in parts)
        wanted = parse_range(self.request.headers.get('Range'), total)
        self.set_header('Accept-Ranges', 'bytes')
        if wanted == 'unsatisfiable':
            self.set_header('Content-Range', 'bytes */%d' % total)
            self.write_json({'error': 'range not satisfiable: the file has '
                             '%d bytes' % total}, 416)
            return
        if wanted is None:
            start, end = 0, total - 1
        else:
            start, end = wanted
            self.set_status(206)
            self.set_header('Content-Range', 'bytes %d-%d/%d'
                            % (start, end, total))
        self.set_header('Content-Type', 'application/octet-stream')
        self.set_header('Content-Length', str(end - start + 1))
        sent = 0
        for path, offset, length in plan_range(parts, start, end):
            # Each chunk file is opened before its first byte is sent and
            # read to its end through that descriptor, so a deletion
            # meanwhile cannot cut a chunk (its frames) in two. A chunk
            # already gone ends the transfer: 404 if nothing was sent, else
            # the connection is closed (a short body, never a torn one).
            try:
                f = await threads.disk(open, path, 'rb')
            except FileNotFoundError:
                if not sent:
                    raise APIError(404, 'stream %s was deleted'
                                   % stream_id) from None
                log.info('download of %s ended after %d bytes: the stream '
                         'was deleted', stream_id, sent)
                self.request.connection.close()  # type: ignore[union-attr]
                return
            try:
                while length > 0:
                    data = await threads.disk(read_at, f, offset,
                                              min(length, READ_SIZE))
                    if not data:
                        break
                    offset += len(data)
                    length -= len(data)
                    sent += len(data)
                    self.write(data)
                    await self.flush()
            except StreamClosedError:
                return  # the client went away
            finally:
                f.close()
        self.finish()
        log.info('sent %d bytes of %s of stream %s (from byte %d of %d)',
                 sent, filename, stream_id, start, total)


default_handlers = [
    (r'/streams/([^/]+)/([^/]+)', DownloadHandler),
]
