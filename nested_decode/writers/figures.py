"""Matplotlib without a screen, and figures written atomically as PNG (any path, ``gs://`` too)."""

import io

from nested_decode import io_utils


def pyplot():
  """``matplotlib.pyplot`` on the Agg backend, imported only when a figure is drawn."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def save_png(fig, path: str) -> None:
  """Writes ``fig`` to ``path`` in one piece and closes it."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=120, bbox_inches='tight')
  pyplot().close(fig)
  io_utils.write_bytes(path, buffer.getvalue())
