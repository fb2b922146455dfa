// The fleet dashboard: polls /status and /stats/donors, draws by hand.
'use strict';
(function () {
  var params = new URLSearchParams(location.search);
  var REFRESH_MS = 1000 * Math.max(1, Number(params.get('refresh')) || 5);
  var SVG = 'http://www.w3.org/2000/svg';

  function $(id) { return document.getElementById(id); }
  function token() { return sessionStorage.getItem('siegetank-admin') || ''; }

  function get(path, auth) {
    var headers = {};
    if (auth && token()) { headers.Authorization = token(); }
    return fetch(path, {headers: headers, cache: 'no-store'}).then(function (r) {
      return r.json().then(function (body) {
        if (!r.ok) { throw new Error(path + ': ' + r.status + ' ' + (body.error || '')); }
        return body;
      });
    });
  }

  function cell(row, text, cls) {
    var td = document.createElement('td');
    td.textContent = text;
    if (cls) { td.className = cls; }
    row.appendChild(td);
  }

  function fill(tbody, rows) {
    tbody.textContent = '';
    rows.forEach(function (cells) {
      var tr = document.createElement('tr');
      cells.forEach(function (c) {
        if (Array.isArray(c)) { cell(tr, c[0], c[1]); } else { cell(tr, c); }
      });
      tbody.appendChild(tr);
    });
  }

  function header(table, names) {
    var tr = document.createElement('tr');
    names.forEach(function (n) {
      var th = document.createElement('th');
      th.textContent = n;
      tr.appendChild(th);
    });
    table.tHead.textContent = '';
    table.tHead.appendChild(tr);
  }

  function ago(t) {
    if (t === null || t === undefined) { return 'never'; }
    var s = Math.max(0, Date.now() / 1000 - t);
    return s < 90 ? Math.round(s) + ' s ago' : Math.round(s / 60) + ' min ago';
  }

  function el(name, attrs, text) {
    var e = document.createElementNS(SVG, name);
    Object.keys(attrs).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined) { e.textContent = text; }
    return e;
  }

  function chart(history) {
    var values = history.frames, n = values.length;
    var W = 720, H = 200, left = 48, bottom = 22, top = 10;
    var max = Math.max.apply(null, values.concat([1]));
    var svg = el('svg', {width: W, height: H, viewBox: '0 0 ' + W + ' ' + H,
                         role: 'img', 'aria-label': 'frames per minute'});
    var plotW = W - left - 8, plotH = H - bottom - top, bw = plotW / n;
    [0, 0.5, 1].forEach(function (f) {
      var y = top + plotH * (1 - f);
      svg.appendChild(el('line', {x1: left, x2: W - 8, y1: y, y2: y}));
      svg.appendChild(el('text', {x: left - 6, y: y + 4, 'text-anchor': 'end'},
                         String(Math.round(max * f))));
    });
    values.forEach(function (v, i) {
      var h = plotH * v / max;
      svg.appendChild(el('rect', {x: left + i * bw + 1, y: top + plotH - h,
                                  width: Math.max(1, bw - 2), height: h,
                                  'class': i === n - 1 ? 'now' : 'bar'}));
    });
    [[0, '-60 min'], [n / 2, '-30 min'], [n - 1, 'now']].forEach(function (p) {
      svg.appendChild(el('text', {x: left + p[0] * bw + bw / 2, y: H - 6,
                                  'text-anchor': 'middle'}, p[1]));
    });
    $('chart').textContent = '';
    $('chart').appendChild(svg);
  }

  function render(status, donors) {
    var ws = status.workservers, names = Object.keys(ws).sort();
    var admin = names.some(function (n) { return ws[n].detail; });
    var online = names.filter(function (n) { return ws[n].online; }).length;
    var s = status.streams, pm = status.per_minute;
    $('ws-online').textContent = online + ' / ' + names.length;
    $('cores-active').textContent = status.cores_active;
    $('streams').textContent = s.idle + ' / ' + s.active + ' / ' + s.stopped;
    $('frames-hour').textContent = status.history.frames.reduce(function (a, b) { return a + b; }, 0);
    $('per-minute').textContent = [pm.assignments, pm.no_work, pm.frames, pm.errors].join(' / ');
    chart(status.history);
    var cols = ['workserver', 'state', 'last seen', 'idle', 'active', 'stopped', 'disk free'];
    if (admin) { cols = cols.concat(['address', 'fails', 'frames 1h', 'errors 1h', 'sessions']); }
    var table = $('workservers');
    header(table, cols);
    fill(table.tBodies[0], names.map(function (n) {
      var w = ws[n], row = [n, w.online ? ['online', 'online'] : ['offline', 'offline'],
        ago(w.last_seen), w.streams.ok, w.streams.active, w.streams.stopped,
        w.disk_free_mb === null ? '-' : Math.round(w.disk_free_mb) + ' MB'];
      if (w.detail) {
        row = row.concat([w.detail.url + ':' + w.detail.http_port, w.detail.fails,
          w.detail.frames_last_hour, w.detail.errors_last_hour, w.detail.sessions_recorded]);
      }
      return row;
    }));
    fill($('targets').tBodies[0], Object.keys(status.targets).sort().map(function (t) {
      return [[t, 'mono'], status.targets[t].queued, status.targets[t].active];
    }));
    fill($('donors').tBodies[0], donors.donors.map(function (d, i) {
      return [i + 1, d.username, d.frames, d.sessions];
    }));
    $('updated').textContent = 'updated ' + new Date().toLocaleTimeString() +
      (admin ? ' (admin view)' : '');
  }

  function refresh() {
    Promise.all([get('/status', true), get('/stats/donors?top=10', false)])
      .then(function (r) { $('error').hidden = true; render(r[0], r[1]); })
      .catch(function (e) { $('error').textContent = String(e.message || e); $('error').hidden = false; })
      .then(function () { setTimeout(refresh, REFRESH_MS); });
  }

  $('admin-form').addEventListener('submit', function (ev) {
    ev.preventDefault();
    sessionStorage.setItem('siegetank-admin', $('admin-token').value.trim());
    $('admin-token').value = '';
  });
  $('admin-clear').addEventListener('click', function () {
    sessionStorage.removeItem('siegetank-admin');
  });
  refresh();
}());
