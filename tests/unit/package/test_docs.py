"""README.md and docs/*.md name only files that exist, and the README stays a front door.

Checked: every markdown link and image (``[text](path)``, ``<img src="path">``) that is not a URL
or an anchor, relative to the file it is in, as GitHub resolves it; and every word inside
backticks (inline code and fenced blocks) that starts with a repository folder, relative to the
repository root. ``{a,b}`` braces are expanded; ``path::test`` and ``configs/x.py:variant`` are
checked as ``path`` and ``configs/x.py``; ``runs/`` paths (outputs) and words with shell
variables or placeholders (``$CONFIG``, ``<schedule>``, ``*``, ``...``) are not paths to check.
"""

import itertools
import pathlib
import re

from conftest import ROOT

REPO = pathlib.Path(ROOT)
README_MAX_LINES = 160
FOLDERS = ('nested_decode/', 'tests/', 'configs/', 'docs/', 'notebooks/', 'launch/', '.ci/')

FENCED = re.compile(r'^```[^\n]*\n(.*?)^```', re.S | re.M)
INLINE = re.compile(r'`([^`\n]+)`')
LINK = re.compile(r'!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')
HTML = re.compile(r'\b(?:src|href)="([^"]+)"')
BRACES = re.compile(r'\{([^{}]*,[^{}]*)\}')
NOT_A_PATH = ('$', '<', '>', '*', '...')


def documents() -> list[pathlib.Path]:
  return [REPO / 'README.md', *sorted((REPO / 'docs').glob('*.md'))]


def expand_braces(word: str) -> list[str]:
  """``a/{b,c}.py`` -> ``['a/b.py', 'a/c.py']`` (several groups multiply)."""
  parts = BRACES.split(word)  # literal, group, literal, group, ..., literal
  choices = [[p] if i % 2 == 0 else p.split(',') for i, p in enumerate(parts)]
  return [''.join(c) for c in itertools.product(*choices)]


def code_words(text: str) -> list[str]:
  """Words inside fenced code blocks and inline code spans."""
  spans = FENCED.findall(text)
  spans += INLINE.findall(FENCED.sub('', text))
  words = []
  for span in spans:
    for word in re.split(r'[\s=]+', span):
      words.append(word.strip('\'"(),;.'))
  return words


def repo_paths(word: str) -> list[str]:
  """The repository paths a code word names: none unless it starts with a repository folder."""
  word = word.split('::')[0].split(':')[0].split('#')[0].rstrip('.,;:)')
  if not word.startswith(FOLDERS) or any(s in word for s in NOT_A_PATH):
    return []
  return expand_braces(word)


def link_targets(text: str) -> list[str]:
  """Local link and image targets (no URLs, no bare anchors), anchors and queries dropped."""
  targets = []
  for target in LINK.findall(text) + HTML.findall(text):
    if re.match(r'^[a-z][a-z0-9+.-]*:', target) or target.startswith('#'):
      continue  # https:, mailto:, gs:, ... and anchors within the page
    targets.append(target.split('#')[0].split('?')[0])
  return targets


def missing_paths(document: pathlib.Path) -> list[str]:
  text = document.read_text(encoding='utf-8')
  missing = []
  for word in code_words(text):
    for path in repo_paths(word):
      if not (REPO / path).exists():
        missing.append(f'`{path}`')
  for target in link_targets(text):
    if (document.parent / target).resolve().is_relative_to(REPO.resolve() / 'runs'):
      continue  # a job's output
    if not all((document.parent / path).exists() for path in expand_braces(target)):
      missing.append(f'({target})')
  return missing


def test_brace_forms_expand_and_code_words_are_found():
  assert expand_braces('nested_decode/metrics/{fid,fvd}.py') == [
      'nested_decode/metrics/fid.py', 'nested_decode/metrics/fvd.py']
  assert expand_braces('a/{b,c}/{d,e}') == ['a/b/d', 'a/b/e', 'a/c/d', 'a/c/e']
  text = ('See `tests/x.py::test_y` and `--config=configs/m.py:tiny`, not `runs/m/eval.json`.\n'
          '```\npython tests/helpers/h.py $DIR configs/$config.py\n```\n')
  found = [path for word in code_words(text) for path in repo_paths(word)]
  assert found == ['tests/helpers/h.py', 'tests/x.py', 'configs/m.py']
  assert link_targets('[a](docs/a.md#x) [b](https://x.org/y) [c](#z) <img src="i.png">') == [
      'docs/a.md', 'i.png']


def test_every_path_the_readme_and_the_guides_name_exists():
  missing = {str(doc.relative_to(REPO)): paths for doc in documents()
             if (paths := missing_paths(doc))}
  assert not missing, f'paths that do not exist: {missing}'


def test_the_readme_is_a_front_door():
  lines = (REPO / 'README.md').read_text(encoding='utf-8').splitlines()
  assert len(lines) <= README_MAX_LINES, (
      f'README.md has {len(lines)} lines; keep it under {README_MAX_LINES} and move details to '
      'docs/')
  assert any(line.startswith('pip install -e ".[dev]" && python -m pytest') for line in lines)
