"""The OpenAPI documents against the routes the two apps really serve:
every (method, path) of the handler lists is documented, and every
documented operation is served. A failure names the missing route."""
import re
import unittest

import tornado.web
import yaml

from server import store
from server.cc.app import CommandCenter
from server.ws.app import WorkServer
from tools.testing import ROOT, settings

METHODS = ('get', 'post', 'put', 'delete', 'patch', 'head', 'options')
DOCS = {'cc': ('docs/openapi.yaml', CommandCenter),
        'ws': ('docs/openapi-ws.yaml', WorkServer)}


def expand(pattern):
    """The paths a route pattern stands for, each path segment that is a
    capture written `{}`: '/streams/(start|stop)/([^/]+)$' gives
    '/streams/start/{}' and '/streams/stop/{}'."""
    pattern = pattern.lstrip('^').rstrip('$')
    pattern = pattern.replace('([^/]+)', '{}')
    choice = re.search(r'\(([A-Za-z0-9_|-]+)\)', pattern)
    if choice is None:
        return [pattern]
    return [path for word in choice.group(1).split('|')
            for path in expand(pattern[:choice.start()] + word
                               + pattern[choice.end():])]


def served(app_class, kind):
    """{(METHOD, path): handler name} of an app's routes."""
    redis = store.connect('redis://127.0.0.1:9/0')  # never connected
    app = app_class(settings(kind), redis, 0)
    found = {}
    for rule in app.wildcard_router.rules:
        handler = rule.target
        for path in expand(rule.matcher.regex.pattern):
            for method in METHODS:
                if getattr(handler, method) is not getattr(
                        tornado.web.RequestHandler, method):
                    found[(method.upper(), path)] = handler.__name__
    return found


def documented(path):
    """{(METHOD, path with '{}' for parameters)} of an OpenAPI file."""
    with open(ROOT + '/' + path) as f:
        doc = yaml.safe_load(f)
    return {(method.upper(), re.sub(r'\{[^}]+\}', '{}', p))
            for p, item in doc['paths'].items()
            for method in item if method in METHODS}


class TestOpenAPI(unittest.TestCase):

    def check(self, kind):
        path, app_class = DOCS[kind]
        routes = served(app_class, kind)
        doc = documented(path)
        missing = sorted('%s %s (%s)' % (m, p, h)
                         for (m, p), h in routes.items() if (m, p) not in doc)
        extra = sorted('%s %s' % op for op in doc - set(routes))
        self.assertEqual(missing, [], 'routes of the %s missing from %s: %s'
                         % (kind, path, '; '.join(missing)))
        self.assertEqual(extra, [], '%s documents operations no route of '
                         'the %s serves: %s' % (path, kind, '; '.join(extra)))

    def test_command_center_document_matches_its_routes(self):
        self.check('cc')

    def test_workserver_document_matches_its_routes(self):
        self.check('ws')

    def test_expand(self):
        self.assertEqual(expand('/streams/(start|stop)/([^/]+)$'),
                         ['/streams/start/{}', '/streams/stop/{}'])
        self.assertEqual(expand('/targets/([^/]+)/([^/]+)$'),
                         ['/targets/{}/{}'])


if __name__ == '__main__':
    unittest.main()
