"""Which JAX backends a process starts: a TPU backend only where the machine has TPU chips.

The dev extra installs ``libtpu`` so that ``--mode=compile_tpu`` compiles for TPU topologies on
any machine. With ``libtpu`` importable, JAX tries a TPU backend first, and on a machine without
TPU chips libtpu logs errors about its accelerator type and worker hostnames before JAX falls
back. Importing ``nested_decode`` therefore names JAX's platforms there, before any JAX
computation starts a backend: the CUDA GPU where there is one and a CUDA-enabled JAX, and the
CPU. Compiling for a TPU topology needs no TPU backend (``jax.experimental.topologies`` loads
libtpu itself). A ``JAX_PLATFORMS`` the user set, or a TPU VM, is left to JAX's own choice.
"""

import glob
import importlib.util
import os
from typing import Callable, Mapping

TPU_DEVICE_PATTERNS = ('/dev/accel*', '/dev/vfio/[0-9]*')  # TPU VMs: v2-v4, v5e and later
NVIDIA_DEVICE_PATHS = ('/dev/nvidia0', '/dev/nvidiactl', '/dev/dxg')
CUDA_PLUGINS = ('jax_cuda12_plugin', 'jax_cuda13_plugin')


def has_tpu_chips() -> bool:
  return any(glob.glob(pattern) for pattern in TPU_DEVICE_PATTERNS)


def has_cuda_gpu() -> bool:
  return (any(os.path.exists(path) for path in NVIDIA_DEVICE_PATHS)
          and any(importlib.util.find_spec(name) for name in CUDA_PLUGINS))


def without_absent_tpu(environ: Mapping[str, str], tpu_chips: Callable[[], bool],
                       cuda_gpu: Callable[[], bool]) -> str | None:
  """The ``jax_platforms`` to set, or None to leave JAX's default (the machine is probed only
  when the user named no platforms)."""
  if 'JAX_PLATFORMS' in environ or tpu_chips():
    return None
  return 'cuda,cpu' if cuda_gpu() else 'cpu'


def leave_out_absent_tpu() -> None:
  if importlib.util.find_spec('libtpu') is None:
    return  # JAX tries no TPU backend without it
  platforms = without_absent_tpu(os.environ, has_tpu_chips, has_cuda_gpu)
  if platforms is not None:
    import jax
    jax.config.update('jax_platforms', platforms)


def prepare_libtpu_for_compiling_only() -> None:
  """Before libtpu loads to describe a TPU slice (``jax.experimental.topologies``)."""
  # libtpu takes a machine-wide lock file when it loads; without this a second JAX process
  # (a test run, another user's job) makes the load fail. Nothing compiled so runs here.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  if not has_tpu_chips():
    # Without chips libtpu cannot find this host's own slice and logs errors about it; the
    # slice compiled for is named apart from these (checked for v5e, v6e and v5p topologies).
    os.environ.setdefault('TPU_HOST_BOUNDS', '1,1,1')
    os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
