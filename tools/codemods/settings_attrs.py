"""Rewrite string lookups on settings objects into attribute access.

    venv/bin/python tools/codemods/settings_attrs.py [--check] PATH...

`server.config.Settings` is a frozen dataclass whose attribute names carry
their units; code written against the old dict (`app.config['key']`,
`settings.get('key', d)`, `self.config[self.body_limit]`, ...) is rewritten
to `app.config.key_in_s`, `settings.key`, `getattr(self.config, ...)`.
It parses each file (ast) and edits only the expressions it recognises, so
it is idempotent and safe on code changed since it last ran; a file it
cannot parse is reported and left alone. `--check` changes nothing and
exits 1 if something would change. A rewritten line longer than 79
columns is named, to wrap by hand.

A settings object is: `<anything>.config`, `<anything>.settings`, a name
`config` or `settings`, or a call of `config.load`/`config.parse_args`/
`settings(...)`; with a string key, only keys `Settings` knows are touched
(raw .conf dicts, named `conf`, keep their keys). Rewritten forms:

    R['key'], R.get('key'), R.get('key', d)  ->  R.attr
    R[expr]                                  ->  getattr(R, expr)
    getattr(R, 'old_key'), R.old_key         ->  R.attr
    R['key'] = v                             ->  R = R.replace(attr=v)
    x in R                                   ->  R.applies(x)
    body_limit = 'old_key', BODY_LIMITS = (...): the names, renamed
"""
import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from server.config import Settings  # noqa: E402

OLD = Settings.old_keys()
ATTRS = {f for kind in ('cc', 'ws') for f in Settings.keys(kind)} | {
    'config_file', 'kind'}
KNOWN = ATTRS | set(OLD)
RECEIVER_NAMES = {'config', 'settings'}
LOADERS = {'load', 'parse_args', 'settings'}
LIMIT_NAMES = {'body_limit', 'BODY_LIMITS'}
SKIP = {os.path.join('server', 'config.py'),
        os.path.join('tools', 'codemods', 'settings_attrs.py')}


def attr_of(key):
    return OLD.get(key, key)


def is_settings(node):
    if isinstance(node, ast.Attribute):
        return node.attr in RECEIVER_NAMES
    if isinstance(node, ast.Name):
        return node.id in RECEIVER_NAMES
    if isinstance(node, ast.Call):
        f = node.func
        return (isinstance(f, ast.Attribute) and f.attr in LOADERS
                and isinstance(f.value, ast.Name) and f.value.id == 'config'
                ) or (isinstance(f, ast.Name) and f.id == 'settings')
    return False


def dynamic_ok(node):
    """Receivers trusted with a non-literal key (no raw dict is called
    this): `<x>.config` and `settings`."""
    return (isinstance(node, ast.Attribute) and node.attr == 'config') or (
        isinstance(node, ast.Name) and node.id == 'settings')


def key_of(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


class Finder(ast.NodeVisitor):
    """Collects (node, replacement text) for one pass."""

    def __init__(self, text):
        self.text = text
        self.edits = []

    def src(self, node):
        return ast.get_source_segment(self.text, node)

    def visit_Subscript(self, node):
        key = key_of(node.slice)
        if isinstance(node.ctx, ast.Load) and is_settings(node.value):
            if key in KNOWN:
                self.edits.append((node, '%s.%s' % (self.src(node.value),
                                                    attr_of(key))))
                return
            if key is None and dynamic_ok(node.value) \
                    and not isinstance(node.slice, ast.Slice):
                self.edits.append((node, 'getattr(%s, %s)' % (
                    self.src(node.value), self.src(node.slice))))
                return
        self.generic_visit(node)

    def visit_Assign(self, node):
        if len(node.targets) == 1 and isinstance(node.targets[0],
                                                 ast.Subscript):
            t = node.targets[0]
            key = key_of(t.slice)
            if is_settings(t.value) and key in KNOWN and isinstance(
                    t.value, (ast.Name, ast.Attribute)):
                r = self.src(t.value)
                self.edits.append((node, '%s = %s.replace(%s=%s)' % (
                    r, r, attr_of(key), self.src(node.value))))
                return
        names = [t.id if isinstance(t, ast.Name) else getattr(t, 'attr', '')
                 for t in node.targets]
        if LIMIT_NAMES & set(names):
            for c in ast.walk(node.value):
                if key_of(c) in OLD:
                    self.edits.append((c, repr(OLD[c.value])))
            return
        self.generic_visit(node)

    def visit_Call(self, node):
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr == 'get' \
                and is_settings(f.value) and node.args \
                and key_of(node.args[0]) in KNOWN and len(node.args) <= 2 \
                and not node.keywords:
            self.edits.append((node, '%s.%s' % (
                self.src(f.value), attr_of(node.args[0].value))))
            return
        if isinstance(f, ast.Name) and f.id in ('getattr', 'hasattr') \
                and len(node.args) >= 2 and is_settings(node.args[0]) \
                and key_of(node.args[1]) in OLD:
            self.edits.append((node.args[1], repr(OLD[node.args[1].value])))
        self.generic_visit(node)

    def visit_Attribute(self, node):
        if node.attr in OLD and is_settings(node.value):
            self.edits.append((node, '%s.%s' % (self.src(node.value),
                                                OLD[node.attr])))
            return
        self.generic_visit(node)

    def visit_Compare(self, node):
        if len(node.ops) == 1 and isinstance(node.ops[0], ast.In) \
                and dynamic_ok(node.comparators[0]):
            left = node.left
            key = key_of(left)
            arg = repr(attr_of(key)) if key is not None else self.src(left)
            self.edits.append((node, '%s.applies(%s)' % (
                self.src(node.comparators[0]), arg)))
            return
        self.generic_visit(node)


def offsets(text):
    """Start offset (in characters) of each line, 1-based."""
    starts = [0, 0]
    for line in text.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    return starts


def span(text, starts, node):
    """Character offsets of `node` (ast columns are UTF-8 bytes)."""
    def at(line, col):
        begin = starts[line]
        raw = text[begin:starts[line + 1] if line + 1 < len(starts)
                   else len(text)]
        return begin + len(raw.encode()[:col].decode())
    return (at(node.lineno, node.col_offset),
            at(node.end_lineno, node.end_col_offset))


def rewrite(text):
    """`text` with every recognised lookup rewritten (to a fixed point)."""
    for _ in range(20):
        finder = Finder(text)
        finder.visit(ast.parse(text))
        if not finder.edits:
            return text
        starts = offsets(text)
        chosen = []
        for node, new in finder.edits:
            a, b = span(text, starts, node)
            if all(b <= c or a >= d for c, d, _ in chosen):
                chosen.append((a, b, new))
        for a, b, new in sorted(chosen, reverse=True):
            text = text[:a] + new + text[b:]
    raise RuntimeError('no fixed point after 20 passes')


def python_files(paths):
    for path in paths:
        if os.path.isfile(path):
            yield path
            continue
        for folder, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if d not in (
                'venv', '__pycache__', 'data', '.git', 'node_modules'))
            for name in sorted(files):
                if name.endswith('.py'):
                    yield os.path.join(folder, name)


def main(argv):
    check = '--check' in argv
    paths = [a for a in argv if a != '--check'] or ['.']
    changed = failed = 0
    for path in python_files(paths):
        if any(os.path.normpath(path).endswith(s) for s in SKIP):
            continue
        with open(path, encoding='utf-8') as f:
            text = f.read()
        try:
            new = rewrite(text)
        except SyntaxError as e:
            print('%s: not parsed, left alone: %s' % (path, e))
            failed += 1
            continue
        if new != text:
            changed += 1
            print('%s: %s' % (path, 'would rewrite' if check
                              else 'rewritten'))
            old_lines = set(text.splitlines())
            for n, line in enumerate(new.splitlines(), 1):
                if len(line) > 79 and line not in old_lines:
                    print('%s:%d: over 79 columns, wrap it by hand'
                          % (path, n))
            if not check:
                with open(path, 'w', encoding='utf-8') as f:
                    f.write(new)
    print('%d file(s) %s, %d not parsed' % (
        changed, 'to rewrite' if check else 'rewritten', failed))
    return 1 if (check and changed) or failed else 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
