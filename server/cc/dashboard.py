"""GET /dashboard: one page of the fleet for operators and donors.

Plain files shipped in static/ (no build step, no CDN): the page fetches
/status and /stats/donors from this CC every few seconds and draws the
frames chart as inline SVG. An admin token typed into the page (kept in
the tab's sessionStorage, sent as Authorization) adds the per-WS detail.
"""
import os

from server.web import APIError, APIHandler, allow

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'static')
FILES = {'dashboard.html': 'text/html; charset=UTF-8',
         'dashboard.js': 'application/javascript; charset=UTF-8',
         'dashboard.css': 'text/css; charset=UTF-8'}
# Everything from this origin only; no inline script or style.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; "
       "connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
       "form-action 'none'; frame-ancestors 'none'")


def _read(name):
    with open(os.path.join(STATIC, name), 'rb') as f:
        return f.read()


class DashboardHandler(APIHandler):
    @allow('anyone')
    async def get(self, name: str = 'dashboard.html') -> None:
        if name not in FILES:
            raise APIError(404, 'no such dashboard file %s' % name)
        self.set_header('Content-Type', FILES[name])
        self.set_header('Content-Security-Policy', CSP)
        self.set_header('X-Content-Type-Options', 'nosniff')
        self.set_header('Cache-Control', 'no-cache')
        self.finish(_read(name))


default_handlers = [
    (r'/dashboard', DashboardHandler),
    (r'/dashboard/([^/]+)', DashboardHandler),
]
