"""How files travel inside JSON (docs/api.md): a name ending in `.b64` carries
base64, `.gz.b64` base64 of gzip, anything else the text itself. Shared by
the manager client, the CLI and the cores so both ends agree."""
import base64
import gzip
import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

# The servers' id and file name grammar (server/web.py; a test checks they
# agree), whole-string: what a client joins into a local path must match
# it, so a hostile server cannot name a path outside the folder.
_UUID4 = (r'[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}'
          r'-[0-9a-f]{12}')
TARGET_ID = re.compile(_UUID4)
STREAM_ID = re.compile(r'%s:[A-Za-z0-9._-]{1,64}' % _UUID4)
FILE_NAME = re.compile(r'[A-Za-z0-9._-]{1,128}')


def safe_target_id(value: object) -> bool:
    return isinstance(value, str) and bool(TARGET_ID.fullmatch(value))


def safe_stream_id(value: object) -> bool:
    return isinstance(value, str) and bool(STREAM_ID.fullmatch(value))


def safe_file_name(value: object) -> bool:
    """A plain name of the servers' grammar: no '..', never '.'."""
    return isinstance(value, str) and bool(FILE_NAME.fullmatch(value)) \
        and '..' not in value and value != '.'


def encode(name: str, data: bytes | str) -> str:
    """The JSON string for file `name` holding `data` (bytes or str)."""
    if isinstance(data, str):
        data = data.encode()
    if name.endswith('.gz.b64'):
        data = gzip.compress(data, mtime=0)
    if name.endswith('.b64'):
        return base64.b64encode(data).decode('ascii')
    return data.decode()


def decode(name: str, text: str | bytes) -> bytes:
    """The bytes of file `name` from its JSON string."""
    data = text.encode() if isinstance(text, str) else text
    if name.endswith('.b64'):
        data = base64.b64decode(data, validate=True)
        if name.endswith('.gz.b64'):
            data = gzip.decompress(data)
    return data


def encode_files(files: Mapping[str, bytes | str]) -> dict[str, str]:
    """{name: bytes} -> {name: JSON string}."""
    return {name: encode(name, data) for name, data in files.items()}


def decode_files(files: Mapping[str, str | bytes]) -> dict[str, bytes]:
    return {name: decode(name, text) for name, text in files.items()}


def wire_name(path: str) -> str:
    """Name a local file is sent under: compressed (`.gz.b64`) unless the
    file is already transport-encoded (ends in `.b64`)."""
    name = os.path.basename(path)
    return name if name.endswith('.b64') else name + '.gz.b64'


def read_for_upload(paths: Iterable[str]) -> dict[str, bytes]:
    """{wire name: bytes} for local files; a `.b64` file is sent verbatim."""
    out: dict[str, bytes] = {}
    for path in paths:
        name = wire_name(path)
        with open(path, 'rb') as f:
            data = f.read()
        if name.endswith('.b64') and os.path.basename(path) == name:
            data = decode(name, data.decode().strip())
        if name in out:
            raise ValueError('two files named %s' % name)
        out[name] = data
    return out


def write_json(path: str, data: Any, mode: int = 0o666) -> None:
    """Replace `path` by `data` as JSON in one step that survives a crash
    (a temporary file, fsynced, renamed). A stricter `mode` is set exactly
    (the CLI's config holds a token)."""
    tmp = path + '.tmp'
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, 'w') as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    if mode != 0o666:
        os.chmod(tmp, mode)
    os.replace(tmp, path)
