"""Add the `from` that ruff's B904 asks for to every raise in an except
clause that lacks one: `from <name>` when the clause binds the exception
(the cause stays in the traceback), `from None` when it does not (the
raise replaces it: a bad input turned into an APIError, say).

    venv/bin/python tools/codemods/raise_from.py [PATH...]

Idempotent (a raise that has its `from` is not reported again). Lines it
makes longer than 79 columns are left to fix by hand (`ruff check .`).
"""
import ast
import collections
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
RUFF = os.path.join(ROOT, 'venv', 'bin', 'ruff')


def findings(paths):
    """{file: {line of a B904 raise}} from ruff."""
    r = subprocess.run([RUFF, 'check', '--select', 'B904',
                        '--output-format', 'json', *paths],
                       cwd=ROOT, capture_output=True, text=True)
    out = collections.defaultdict(set)
    for item in json.loads(r.stdout or '[]'):
        out[item['filename']].add(item['location']['row'])
    return out


def fix(text, lines):
    """`text` with ` from ...` added to the raises starting on `lines`."""
    tree = ast.parse(text)
    rows = text.split('\n')
    starts = [0]
    for row in rows:
        starts.append(starts[-1] + len(row) + 1)

    def offset(line, col):
        return starts[line - 1] + len(rows[line - 1].encode()[:col].decode())

    edits = []

    def walk(node, handler):
        for child in ast.iter_child_nodes(node):
            inner = handler
            if isinstance(child, ast.ExceptHandler):
                inner = child
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                    ast.Lambda, ast.ClassDef)):
                inner = None
            if (isinstance(child, ast.Raise) and child.lineno in lines
                    and child.exc is not None and child.cause is None
                    and handler is not None):
                edits.append((offset(child.exc.end_lineno,
                                     child.exc.end_col_offset),
                              ' from %s' % (handler.name or 'None')))
            walk(child, inner)

    walk(tree, None)
    for at, new in sorted(edits, reverse=True):
        text = text[:at] + new + text[at:]
    return text, len(edits)


def main(paths):
    total = 0
    for path, lines in sorted(findings(paths or ['.']).items()):
        with open(path, encoding='utf-8') as f:
            text = f.read()
        new, n = fix(text, lines)
        if n:
            with open(path, 'w', encoding='utf-8') as f:
                f.write(new)
            print('%s: %d raise(s)' % (os.path.relpath(path, ROOT), n))
            total += n
    print('%d raise(s) given a from' % total)
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
