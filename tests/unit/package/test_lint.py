"""The package, the tests and the configs are clean under the project's lint rules (ruff.toml)."""

import subprocess
import sys

from conftest import ROOT


def ruff(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'ruff', 'check', '--no-cache',
                         '--output-format', 'concise', *args], cwd=ROOT, capture_output=True,
                        text=True, check=False)


def test_the_code_is_clean_under_the_lint_rules():
  result = ruff('nested_decode', 'tests', 'configs')
  assert result.returncode == 0, result.stdout + result.stderr


def test_the_lint_sees_a_long_line(tmp_path):
  bad = tmp_path / 'bad.py'
  bad.write_text(f"x = '{'a' * 120}'\nimport os\n")
  result = ruff('--config', f'{ROOT}/ruff.toml', str(bad))
  assert result.returncode == 1 and 'E501' in result.stdout and 'F401' in result.stdout
