"""Incremental, resumable sync of committed frames into a local folder
(`Target.sync`, `Stream.sync`, `siegetank sync`).

One call learns what grew (`GET /targets/streams/<id>`: frames per
stream), then only the streams that grew are fetched, each file with
`Range: bytes=<local size>-`, so only new bytes move. A target's folder:

    FOLDER/target.json                 {target_id, topology}
    FOLDER/topology.pdb                the target's topology (a target file
                                       topology.pdb[.gz.b64]), when it has one
    FOLDER/streams/<stream id>/        one stream (Stream.sync's folder):
        frames.xtc                     its committed frames, whole commits
        stream.json                    {stream_id, target_id, frames, tags,
                                        status}

A local file only ever grows by whole commits: the WS serves a file as
the concatenation of its committed chunks, and a Range reply ends at the
total it had when the request came. New bytes land in `NAME.part-<offset>`
(`offset` = where they go in NAME); once the reply is complete it becomes
`NAME.done-<offset>`, is appended to NAME and fsynced, then removed. A sync
killed at any instant resumes: a `.part` continues its download from where
it stopped, a `.done` is appended again from `offset` (NAME is cut back to
it first). So NAME is always a prefix of the committed trajectory made of
whole commits, and after a completed sync it is byte-identical to it.

Nothing a server names reaches a path unchecked: stream ids and file names
must match the servers' grammar (siegetank.files) whole, else the entry is
skipped with a warning (a hostile CC or WS could list `../../x` or an
absolute path).
"""
import glob
import json
import logging
import os
import re

import requests

from siegetank.errors import SiegetankError, why
from siegetank.files import safe_file_name, safe_stream_id, write_json

log = logging.getLogger('siegetank.sync')

TAIL = re.compile(r'\.(part|done)-(\d+)$')
CHUNK = 1 << 16


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


def _size(path):
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


def _append(path, tail, offset):
    """Make `path` its first `offset` bytes followed by `tail`, durably."""
    with open(path, 'ab') as f:
        f.truncate(offset)
        with open(tail, 'rb') as src:
            while True:
                block = src.read(1 << 20)
                if not block:
                    break
                f.write(block)
        f.flush()
        os.fsync(f.fileno())
    os.unlink(tail)


def _settle(path):
    """Finish or drop what an interrupted sync left next to `path`; returns
    (offset, bytes already in its .part file) to resume from."""
    for tail in sorted(glob.glob(glob.escape(path) + '.*-*')):
        m = TAIL.search(tail)
        if not m or tail[:m.start()] != path:
            continue
        offset = int(m.group(2))
        if m.group(1) == 'done' and _size(path) >= offset:
            _append(path, tail, offset)
        elif m.group(1) == 'part' and _size(path) == offset:
            return offset, _size(tail)
        else:
            os.unlink(tail)  # stale: the file moved on without it
    return _size(path), 0


def fetch_file(stream, filename, path, progress=None):
    """Bring `path` up to the committed bytes of the stream's `filename`;
    returns the number of bytes received. `progress(n)` is called with
    each block's size."""
    offset, have = _settle(path)
    start = offset + have
    reply = stream.client.request(
        'GET', '/streams/%s/%s' % (stream.id, filename), stream=True,
        headers={'Range': 'bytes=%d-' % start}, ok=(200, 206, 416))
    part = '%s.part-%d' % (path, offset)
    received = 0
    try:
        total = reply.headers.get('Content-Range', '').rpartition('/')[2]
        if reply.status_code == 416:
            if total.isdigit() and int(total) < start:
                raise SiegetankError(
                    '%s holds %d bytes, more than the %s bytes of %s of '
                    'stream %s: not a copy of it' % (
                        path, start, total, filename, stream.id))
            if have:  # the .part held everything: finish it
                os.replace(part, '%s.done-%d' % (path, offset))
                _append(path, '%s.done-%d' % (path, offset), offset)
            elif os.path.exists(part):  # made empty just before a kill
                os.unlink(part)
            return 0
        if reply.status_code == 200:
            if start:  # the server ignored Range: not a safe resume
                raise SiegetankError('%s of stream %s was served whole to a '
                                     'Range request' % (filename, stream.id))
        elif not reply.headers.get('Content-Range', '').startswith(
                'bytes %d-' % start):
            raise SiegetankError('%s of stream %s: Range reply %r does not '
                                 'start at %d' % (filename, stream.id,
                                                  reply.headers.get(
                                                      'Content-Range'),
                                                  start))
        with open(part, 'ab') as f:
            for block in reply.iter_content(CHUNK):
                f.write(block)
                received += len(block)
                if progress:
                    progress(len(block))
            f.flush()
            os.fsync(f.fileno())
        length = reply.headers.get('Content-Length')
        if length is not None and received != int(length):
            raise SiegetankError('%s of stream %s: %d of %s bytes arrived; '
                                 'sync again to resume' % (
                                     filename, stream.id, received, length))
    except requests.RequestException as e:
        raise SiegetankError('sync of %s of stream %s interrupted (%s); sync '
                             'again to resume' % (filename, stream.id,
                                                  why(e))) from e
    finally:
        reply.close()
    done = '%s.done-%d' % (path, offset)
    os.replace(part, done)
    _append(path, done, offset)
    return received


def pending(folder, filenames):
    """True if an interrupted sync left work in this stream folder."""
    return any(glob.glob(glob.escape(os.path.join(folder, name)) + '.*-*')
               for name in filenames)


def sync_stream(stream, folder, filenames=('frames.xtc',), info=None,
                progress=None):
    """Sync one stream into `folder`; `info` is its entry of the target's
    listing (else asked for). Returns the bytes received (0, and no
    request for frames, when it has not grown since the last sync)."""
    os.makedirs(folder, exist_ok=True)
    if info is None:
        info = stream.reload_info()
    record_path = os.path.join(folder, 'stream.json')
    record = read_json(record_path) or {}
    frames = info.get('frames', 0)
    if record.get('frames') == frames and not pending(folder, filenames):
        return 0
    received = 0
    if frames or pending(folder, filenames):
        for name in filenames:
            received += fetch_file(stream, name, os.path.join(folder, name),
                                   progress)
    write_json(record_path, {
        'stream_id': stream.id, 'target_id': info.get('target_id'),
        'frames': frames, 'tags': info.get('tags', {}),
        'status': info.get('status')})
    return received


def topology_file(target):
    """The name of the target file that holds its topology (a PDB), or
    None."""
    for name in sorted(target.reload_info().get('files') or ()):
        if not safe_file_name(name):
            log.warning('target %s lists a file named %r: not a plain '
                        'name, skipped', target.id, name)
        elif name.split('.')[:2] == ['topology', 'pdb']:
            return name
    return None


def checked_listing(listing):
    """The entries of a target's stream listing whose id is a stream id
    and whose info is an object; the others are skipped with a warning."""
    out = {}
    for sid, info in listing.items():
        if safe_stream_id(sid) and isinstance(info, dict):
            out[sid] = info
        else:
            log.warning('the server lists a stream %r: not a stream id (or '
                        'no info), skipped', sid)
    return out


def sync_target(target, folder, filenames=('frames.xtc',), progress=None,
                on_stream=None):
    """Sync every stream of `target` under `folder` (see the module doc).
    Returns {'bytes': received, 'grown': [stream ids fetched],
    'streams': {stream id: listing entry}}."""
    os.makedirs(os.path.join(folder, 'streams'), exist_ok=True)
    meta_path = os.path.join(folder, 'target.json')
    meta = read_json(meta_path)
    if meta is None or meta.get('target_id') != target.id:
        if meta is not None:
            raise SiegetankError('%s holds target %s, not %s' % (
                folder, meta.get('target_id'), target.id))
        top = topology_file(target)
        if top:
            target.download(top, os.path.join(folder, 'topology.pdb'))
        meta = {'target_id': target.id, 'topology':
                'topology.pdb' if top else None}
        write_json(meta_path, meta)
    listing = checked_listing(target.stream_info())
    grown = []
    for sid, info in sorted(listing.items()):
        sub = os.path.join(folder, 'streams', sid)
        record = read_json(os.path.join(sub, 'stream.json')) or {}
        if record.get('frames') != info.get('frames') \
                or pending(sub, filenames):
            grown.append(sid)
    received = 0
    for i, sid in enumerate(grown):
        if on_stream:
            on_stream(i, len(grown), sid)
        received += sync_stream(target.client.stream(sid),
                                os.path.join(folder, 'streams', sid),
                                filenames, dict(listing[sid],
                                                target_id=target.id),
                                progress)
    return {'bytes': received, 'grown': grown, 'streams': listing}


def local_streams(folder):
    """{stream id: its stream.json} of a synced target folder."""
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, 'streams', '*',
                                              'stream.json'))):
        record = read_json(path)
        if not isinstance(record, dict):
            continue
        if safe_stream_id(record.get('stream_id')):
            out[record['stream_id']] = record
        else:
            log.warning('%s names stream %r: not a stream id, skipped',
                        path, record.get('stream_id'))
    return out
