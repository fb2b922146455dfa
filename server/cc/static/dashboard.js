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

  // Axis values 0, step, 2 step, ... up to the first at or above `max`:
  // whole numbers, each once (an empty hour has just 0 and 1).
  function ticks(max) {
    var step = 1, k = 0;  // 1, 2, 5, 10, 20, 50, ...: at most 4 intervals
    while (Math.ceil(max / step) > 4) {
      k += 1;
      step = [1, 2, 5][k % 3] * Math.pow(10, Math.floor(k / 3));
    }
    var top = Math.max(step, Math.ceil(max / step) * step), out = [];
    for (var v = 0; v <= top; v += step) { out.push(v); }
    return out;
  }

  function chart(history) {
    var values = history.frames, n = values.length;
    var W = 720, H = 200, left = 48, bottom = 22, top = 10;
    var marks = ticks(Math.max.apply(null, values));
    var max = marks[marks.length - 1];
    var svg = el('svg', {width: W, height: H, viewBox: '0 0 ' + W + ' ' + H,
                         role: 'img', 'aria-label': 'frames per minute'});
    var plotW = W - left - 8, plotH = H - bottom - top, bw = plotW / n;
    marks.forEach(function (v) {
      var y = top + plotH * (1 - v / max);
      svg.appendChild(el('line', {x1: left, x2: W - 8, y1: y, y2: y}));
      svg.appendChild(el('text', {x: left - 6, y: y + 4, 'text-anchor': 'end',
                                  'class': 'y-label'}, String(v)));
    });
    values.forEach(function (v, i) {
      var h = plotH * v / max;
      svg.appendChild(el('rect', {x: left + i * bw + 1, y: top + plotH - h,
                                  width: Math.max(1, bw - 2), height: h,
                                  'class': i === n - 1 ? 'now' : 'bar'}));
    });
    [[0, '-60 min', 'start'], [n / 2, '-30 min', 'middle'], [n - 1, 'now', 'end']].forEach(function (p) {
      var x = left + (p[2] === 'end' ? p[0] + 1 : p[0]) * bw;
      svg.appendChild(el('text', {x: x, y: H - 6, 'text-anchor': p[2],
                                  'class': 'x-label'}, p[1]));
    });
    if (values.every(function (v) { return v === 0; })) {
      svg.appendChild(el('text', {x: left + plotW / 2, y: top + plotH / 2,
                                  'text-anchor': 'middle', 'class': 'empty'},
                         'no frames in the last hour'));
    }
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
      var w = ws[n], state = w.online ? 'online' : 'offline';
      var row = [n, w.draining ? [state + ', draining', 'draining'] : [state, state],
        ago(w.last_seen), w.streams.ok, w.streams.active, w.streams.stopped,
        w.disk_free_mb === null ? '-' : Math.round(w.disk_free_mb) + ' MB'];
      if (w.detail) {
        row = row.concat([w.detail.url + ':' + w.detail.http_port, w.detail.fails,
          w.detail.frames_last_hour, w.detail.errors_last_hour, w.detail.sessions_recorded]);
      }
      return row;
    }));
    // Targets by description (the id only when there is none), each
    // row's id on hover; an admin also sees the owner.
    var targets = status.targets, ids = Object.keys(targets);
    function label(t) { return targets[t].description || t; }
    ids.sort(function (a, b) { return label(a).localeCompare(label(b)) || a.localeCompare(b); });
    header($('targets'), admin ? ['target', 'owner', 'queued', 'active'] : ['target', 'queued', 'active']);
    fill($('targets').tBodies[0], ids.map(function (t) {
      var row = [targets[t].description ? [label(t), 'described'] : [t, 'mono']];
      if (admin) { row.push(targets[t].owner || '-'); }
      return row.concat([targets[t].queued, targets[t].active]);
    }));
    Array.prototype.forEach.call($('targets').tBodies[0].rows, function (tr, i) {
      tr.cells[0].title = ids[i];
    });
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
