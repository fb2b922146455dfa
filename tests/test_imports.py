"""The package boundaries the layout promises, read from the source (every
import, also those inside functions): no import cycle between modules of
server/ and siegetank/, siegetank/ imports nothing from server/ (the
client installs alone), and the servers import nothing from tools/."""
import ast
import os
import unittest

from tools.testing import ROOT

PACKAGES = ('server', 'siegetank')


def modules(*packages):
    """{dotted name: path} of every module under `packages`."""
    found = {}
    for package in packages:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for f in files:
                if f.endswith('.py'):
                    path = os.path.join(folder, f)
                    name = os.path.relpath(path, ROOT)[:-3].replace(os.sep,
                                                                   '.')
                    found[name.removesuffix('.__init__')] = path
    return found


def imported(path, known):
    """The modules of `known` that the module at `path` imports: `from a
    import b` is a.b when that is a module, else a."""
    with open(path) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 \
                and node.module:
            for a in node.names:
                sub = '%s.%s' % (node.module, a.name)
                names.add(sub if sub in known else node.module)
    return {n for n in names if n.split('.')[0] in known or n in known}


def cycles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


class TestImports(unittest.TestCase):
    def setUp(self):
        self.known = modules(*PACKAGES, 'tools')
        self.graph = {m: {i for i in imported(p, self.known)
                          if i in self.known and i != m}
                      for m, p in self.known.items()
                      if m.split('.')[0] in PACKAGES}

    def test_no_import_cycles(self):
        graph = {m: {i for i in deps if i in self.graph}
                 for m, deps in self.graph.items()}
        self.assertEqual(cycles(graph), [])

    def test_the_client_needs_no_server(self):
        leaks = {m: sorted(i for i in deps if i.split('.')[0] != 'siegetank')
                 for m, deps in self.graph.items()
                 if m.split('.')[0] == 'siegetank'}
        self.assertEqual({m: d for m, d in leaks.items() if d}, {})

    def test_the_servers_need_no_tools(self):
        leaks = {m: sorted(i for i in deps if i.split('.')[0] == 'tools')
                 for m, deps in self.graph.items()
                 if m.split('.')[0] == 'server'}
        self.assertEqual({m: d for m, d in leaks.items() if d}, {})

    def test_a_cycle_is_found(self):
        self.assertEqual(cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'},
                                 'd': {'a'}}), [['a', 'b', 'c']])
