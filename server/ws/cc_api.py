"""The endpoints the command center calls on a workserver, with its
`cc_pass`: stream creation and activation, stream and target commands, and
the listings. Thin: the model is streams.py."""
import asyncio
import functools

from server import tokens
from server.sessions_common import MAX_ACTIVATIONS
from server.web import (
    TARGET_ID,
    APIError,
    APIHandler,
    Permission,
    allow,
    check_files,
    check_stream_id,
    check_tags,
    check_target_id,
    decode_files,
    role,
)
from server.ws import streams


def cc_passes(config):
    """The passes of every configured command center."""
    return [cc['pass'] for cc in config.command_centers.values()]


def cc_named(config, token):
    """The name of the configured command center whose pass `token` is,
    or None (every pass compared, in constant time)."""
    found = None
    for name, cc in sorted(config.command_centers.items()):
        if tokens.matches_any(token, [cc['pass']]) and found is None:
            found = name
    return found


@role('cc', 'missing or wrong cc_pass')
async def _command_center(handler: APIHandler, rule: Permission) -> str | None:
    """A configured command center: `Authorization: <its cc_pass>`; its
    name is the caller."""
    return cc_named(handler.config, handler.token())


class CCHandler(APIHandler):
    """Endpoints for the command centers (`@allow('cc')`). `self.cc` is
    the caller's name: a stream or target is only for the command center
    that made it (404 or 403 for the others)."""

    @property
    def cc(self) -> str:
        return self.caller

    def target_id(self):
        return self.field('target_id', str, check=TARGET_ID.fullmatch)


class StreamsHandler(CCHandler):
    body_limit = 'max_body_size_in_bytes'

    @allow('cc')
    async def get(self):
        """{streams: {stream_id: creation_date}} (for reconciliation)."""
        self.write_json({'streams': await streams.all_streams(
            self.application, self.cc)})

    @allow('cc')
    async def post(self):
        tid = self.target_id()
        most = self.config.max_files_per_request
        stream_files = check_files(self.field('stream_files', dict),
                                   'stream_files', max_files=most)
        target_files = self.field('target_files', dict, None)
        groups = [stream_files]
        if target_files is not None:
            # A target may have no files of its own (docs/api.md: files?).
            groups.append(check_files(target_files, 'target_files',
                                      allow_empty=True, max_files=most))
        # Stored as sent; every .b64/.gz.b64 must decode within the limits.
        await decode_files(self.config, *groups, keep=False)
        tags = check_tags(self.field('tags', dict, {}))
        # The CC's name for this creation (a uuid4): sent again, it finds
        # the stream made the first time.
        creation_id = self.field('creation_id', str, None,
                                 check=TARGET_ID.fullmatch)
        sid = await streams.create_stream(self.application, tid,
                                          stream_files, target_files,
                                          self.cc, tags, creation_id)
        self.write_json({'stream_id': sid})


class ActivateHandler(CCHandler):
    def activation(self, item):
        """The arguments of streams.activate (after the app) from one
        activation's fields (the body, or an item of `activations`); 400 if
        one is wrong."""
        f = functools.partial(self.field, body=item)
        return (f('target_id', str, check=TARGET_ID.fullmatch),
                f('donor_id', (str, type(None)), None),
                f('client', str, None, check=lambda c: 0 < len(c) <= 256),
                self.cc,
                f('engine', str, '', check=lambda v: len(v) <= 64),
                f('core_version', (str, type(None)), '',
                  check=lambda v: v is None or len(v) <= 64) or '',
                f('vouched', bool, False))

    @allow('cc')
    async def post(self):
        """One activation (its fields in the body), or several at once
        (`activations`: a list of such objects), each its own atomic step,
        all sent to Redis together; each gets a token or an error."""
        app = self.application
        many = self.field('activations', list, None,
                          check=lambda a: 0 < len(a) <= MAX_ACTIVATIONS)
        if many is None:
            token, sid, session = await streams.activate(
                app, *self.activation(self.body))
            self.write_json({'token': token, 'stream_id': sid,
                             'session': session})
            return
        if not all(isinstance(item, dict) for item in many):
            raise APIError(400, 'field activations must list objects')
        asked = [self.activation(item) for item in many]
        done = await asyncio.gather(
            *(streams.activate(app, *args) for args in asked),
            return_exceptions=True)
        out = []
        for result in done:
            if isinstance(result, APIError) and result.status_code == 503:
                out.append({'error': result.message})
            elif isinstance(result, BaseException):
                raise result  # the store is down: a 503 for all
            else:
                out.append({'token': result[0], 'stream_id': result[1],
                            'session': result[2]})
        self.write_json({'activations': out})


class StreamCommandHandler(CCHandler):
    COMMANDS = {'start': streams.start_stream, 'stop': streams.stop_stream,
                'delete': streams.delete_stream}

    @allow('cc')
    async def put(self, command, stream_id):
        await self.COMMANDS[command](self.application,
                                     check_stream_id(stream_id), self.cc)
        self.write_json({})


class StreamInfoHandler(CCHandler):
    @allow('cc')
    async def get(self, stream_id):
        self.write_json(await streams.stream_info(
            self.application, check_stream_id(stream_id), self.cc))


class TargetStreamsHandler(CCHandler):
    @allow('cc')
    async def get(self, target_id):
        self.write_json(await streams.target_streams(
            self.application, check_target_id(target_id), self.cc))


class DeleteTargetHandler(CCHandler):
    @allow('cc')
    async def put(self, target_id):
        await streams.delete_target(self.application,
                                    check_target_id(target_id), self.cc)
        self.write_json({})


class ActiveStreamsHandler(CCHandler):
    @allow('cc')
    async def get(self):
        self.write_json(await streams.active_streams(self.application,
                                                     self.cc))


PART = r'([^/]+)'  # one path segment
default_handlers = [
    (r'/streams', StreamsHandler),
    (r'/streams/activate', ActivateHandler),
    (r'/streams/(start|stop|delete)/' + PART, StreamCommandHandler),
    (r'/streams/info/' + PART, StreamInfoHandler),
    (r'/targets/streams/' + PART, TargetStreamsHandler),
    (r'/targets/delete/' + PART, DeleteTargetHandler),
    (r'/active_streams', ActiveStreamsHandler),
]
