"""Reads PyTorch weight files as numpy arrays without PyTorch and without running their code.

Two formats: the zip archive of ``torch.save`` (>= 1.6) and ``torch.jit.save`` (``<root>/data.pkl``
plus one blob per storage under ``<root>/data/``), and the legacy ``torch.save`` stream (a
sequence of pickles followed by the raw storages). The pickles are read with an unpickler that
admits only what weights need: tensors are rebuilt as numpy arrays from their storages,
``OrderedDict`` stays a dict, and a TorchScript module (``__torch__.<class>``) becomes a
``ScriptObject`` holding its attributes. Any other global (the way a pickle runs code) is refused,
and the TorchScript ``code/`` in the archive is never read.
"""

import collections
import dataclasses
import functools
import pickle
import zipfile

import numpy as np

_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'LongStorage': np.int64, 'IntStorage': np.int32, 'ShortStorage': np.int16,
    'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


class TorchFileError(ValueError):
  """The file is not a PyTorch weight file this reader accepts; the message names it."""


class ScriptObject:
  """A TorchScript module from ``torch.jit.save``: its class name and its attributes."""
  class_name = ''

  def __init__(self, attributes=None):
    self.attributes = dict(attributes or {})

  def __setstate__(self, state):
    self.attributes = dict(state)

  def __repr__(self):
    return f'ScriptObject({self.class_name}, {sorted(self.attributes)})'


@functools.cache
def _script_class(class_name: str) -> type:
  return type('ScriptObject', (ScriptObject,), {'class_name': class_name})


@dataclasses.dataclass(frozen=True)
class _StorageType:
  dtype: type


def _rebuild_tensor(storage, offset, size, stride, *unused):
  del unused  # requires_grad, backward hooks, metadata
  if isinstance(storage, _PendingStorage):
    return _PendingTensor(storage, offset, tuple(size), tuple(stride))
  return np.lib.stride_tricks.as_strided(
      storage[offset:], shape=tuple(size),
      strides=tuple(s * storage.itemsize for s in stride)).copy()


def _rebuild_parameter(data, *unused):
  del unused
  return data


@dataclasses.dataclass
class _PendingStorage:
  """A legacy-format storage: its bytes come after the pickle that refers to it."""
  key: str
  dtype: type


@dataclasses.dataclass
class _PendingTensor:
  storage: _PendingStorage
  offset: int
  size: tuple
  stride: tuple


class _WeightsUnpickler(pickle.Unpickler):

  def __init__(self, file, path: str, load_storage=None):
    super().__init__(file)
    self._path = path
    self._load_storage = load_storage

  def find_class(self, module: str, name: str):
    if module.startswith('__torch__'):
      return _script_class(f'{module}.{name}')
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(_STORAGE_DTYPES[name])
    allowed = {
        ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
        ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
        ('collections', 'OrderedDict'): collections.OrderedDict,
        ('torch.jit._pickle', 'build_intlist'): list,
        ('torch.jit._pickle', 'build_doublelist'): list,
        ('torch.jit._pickle', 'build_boollist'): list,
    }
    if (module, name) not in allowed:
      raise TorchFileError(f'{self._path}: refusing to unpickle {module}.{name} (not a tensor '
                           'or container of weights)')
    return allowed[(module, name)]

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == 'storage') or not self._load_storage:
      raise TorchFileError(f'{self._path}: unexpected persistent id {pid!r}')
    storage_type, key = pid[1], str(pid[2])
    if not isinstance(storage_type, _StorageType):
      raise TorchFileError(f'{self._path}: storage {key} of unsupported type {storage_type!r}')
    if len(pid) > 5 and pid[5] is not None:
      raise TorchFileError(f'{self._path}: storage views (torch < 0.4 files) are not supported')
    return self._load_storage(key, storage_type.dtype)


def _read_zip(path: str):
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith('/data.pkl') and n.count('/') == 1]
    if len(pickles) != 1:
      raise TorchFileError(f'{path}: a PyTorch zip archive has one <root>/data.pkl, found '
                           f'{pickles or "none"}')
    root = pickles[0].split('/')[0]

    def load_storage(key, dtype):
      return np.frombuffer(archive.read(f'{root}/data/{key}'), dtype)

    with archive.open(pickles[0]) as f:
      return _WeightsUnpickler(f, path, load_storage).load()


def _read_legacy(path: str):
  with open(path, 'rb') as f:
    if _WeightsUnpickler(f, path).load() != _LEGACY_MAGIC:
      raise TorchFileError(f'{path}: neither a zip archive nor a legacy torch.save file')
    _WeightsUnpickler(f, path).load()  # protocol version
    _WeightsUnpickler(f, path).load()  # system info
    pending = {}

    def load_storage(key, dtype):
      return pending.setdefault(key, _PendingStorage(key, dtype))

    tree = _WeightsUnpickler(f, path, load_storage).load()
    storages = {}
    for key in _WeightsUnpickler(f, path).load():
      count = int(np.frombuffer(f.read(8), '<i8')[0])
      dtype = np.dtype(pending[key].dtype)
      storages[key] = np.frombuffer(f.read(count * dtype.itemsize), dtype)

  def resolve(node):
    if isinstance(node, _PendingTensor):
      return _rebuild_tensor(storages[node.storage.key], node.offset, node.size, node.stride)
    if isinstance(node, dict):
      return type(node)((k, resolve(v)) for k, v in node.items())
    return node

  return resolve(tree)


def read(path: str):
  """The object saved in the PyTorch file at ``path``, with tensors as numpy arrays."""
  try:
    if zipfile.is_zipfile(path):
      return _read_zip(path)
    return _read_legacy(path)
  except (pickle.UnpicklingError, EOFError, KeyError, zipfile.BadZipFile) as e:
    raise TorchFileError(f'{path}: not a readable PyTorch weight file ({e})') from e
