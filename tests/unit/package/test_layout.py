"""The package's layers: library code (models, decoding, inference, training, data, metrics,
networks, the API) never imports the jobs (the pipeline, the tools, the studies, ``main``);
decoding a trained model (the API, ``inference/``, ``decoding/``, ``models/``) imports nothing
from training or the jobs; and no modules import each other in a circle, counting imports
inside functions."""

import ast
import pathlib

from conftest import ROOT

PACKAGE = pathlib.Path(ROOT) / 'nested_decode'
JOBS = ('nested_decode.pipeline', 'nested_decode.tools', 'nested_decode.studies',
        'nested_decode.main')


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def package_imports(modules: set[str]) -> dict[str, set[str]]:
  """``{module: package modules it imports anywhere in its source}``."""
  graph = {}
  for path in PACKAGE.rglob('*.py'):
    name = module_name(path)
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        imported.update(alias.name for alias in node.names)
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        for alias in node.names:  # `from pkg import module` or `from module import name`
          full = f'{node.module}.{alias.name}'
          imported.add(full if full in modules else node.module)
    graph[name] = {m for m in imported if m in modules and m != name
                   and not (m == 'nested_decode' or name.startswith(m + '.'))}
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(node):
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for succ in graph[node]:
      if succ not in index:
        visit(succ)
        low[node] = min(low[node], low[succ])
      elif succ in on_stack:
        low[node] = min(low[node], index[succ])
    if low[node] == index[node]:
      component = []
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == node:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return found


def graph_of_package() -> dict[str, set[str]]:
  modules = {module_name(path) for path in PACKAGE.rglob('*.py')}
  return package_imports(modules)


def test_library_code_never_imports_the_jobs():
  graph = graph_of_package()
  upward = {name: sorted(m for m in imported if m.startswith(JOBS))
            for name, imported in graph.items() if not name.startswith(JOBS)}
  assert not {name: m for name, m in upward.items() if m}
  assert 'nested_decode.api' in graph['nested_decode.pipeline.stages']  # the graph is read right


INFERENCE = ('nested_decode.api', 'nested_decode.inference', 'nested_decode.decoding',
             'nested_decode.models')


def test_decoding_a_trained_model_never_imports_training():
  graph = graph_of_package()
  below = {name: sorted(m for m in imported if m.startswith(('nested_decode.training', *JOBS)))
           for name, imported in graph.items() if name.startswith(INFERENCE)}
  assert not {name: m for name, m in below.items() if m}
  assert 'nested_decode.inference.restore' in graph['nested_decode.api']  # read right


def test_no_import_cycles():
  assert cycles(graph_of_package()) == []


def test_cycle_finder_sees_a_circle():
  graph = {'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}
  assert cycles(graph) == [['a', 'b', 'c']]
