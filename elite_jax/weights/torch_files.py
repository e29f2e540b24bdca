"""PyTorch checkpoint files (.pt/.bin/.pth and .safetensors) as numpy arrays, without importing torch.

``load_state_dict`` reads the two formats the official code and the Hugging Face hub use:

- ``.safetensors``: parsed here (8-byte header length, JSON header, raw little-endian data) rather than with
  ``safetensors.numpy``, which cannot represent bfloat16 or float8 tensors.
- ``torch.save`` zip archives (PyTorch >= 1.6): ``<prefix>/data.pkl`` is unpickled by a restricted unpickler that knows
  only dicts, tensor rebuild functions, storage types and dtypes. Anything else, e.g. a pickle that asks for
  ``os.system``, is refused before it runs. Tensor bytes come from ``<prefix>/data/<key>``.

Dtypes: bfloat16 and float8 tensors come back as ``ml_dtypes`` arrays (jax's own dtypes, lossless, ``.astype`` works);
everything else as the matching numpy dtype, in native byte order.

Nested checkpoints: a top-level ``"state_dict"`` dict (Lightning and many training scripts) is unwrapped; other nested
dicts are flattened with "."-joined keys; leaves that are not tensors (step counters, strings, lists) are dropped.
"""

from __future__ import annotations

import collections
import json
import math
import os
import pickle
import sys
import zipfile
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from elite_jax.errors import InputError
from elite_jax.files import atomic_path

_BF16 = np.dtype(ml_dtypes.bfloat16)

# Legacy typed storage classes (torch.save writes these for every dtype that has one) -> element dtype.
_STORAGE_DTYPES = {
  "FloatStorage": np.dtype(np.float32), "DoubleStorage": np.dtype(np.float64), "HalfStorage": np.dtype(np.float16),
  "BFloat16Storage": _BF16, "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32),
  "ShortStorage": np.dtype(np.int16), "CharStorage": np.dtype(np.int8), "ByteStorage": np.dtype(np.uint8),
  "BoolStorage": np.dtype(np.bool_), "ComplexFloatStorage": np.dtype(np.complex64),
  "ComplexDoubleStorage": np.dtype(np.complex128),
}

# torch dtypes as pickled (``torch.<name>``); _rebuild_tensor_v3 passes one for dtypes without a typed storage class.
_TORCH_DTYPES = {
  "float32": np.dtype(np.float32), "float64": np.dtype(np.float64), "float16": np.dtype(np.float16),
  "bfloat16": _BF16, "int64": np.dtype(np.int64), "int32": np.dtype(np.int32), "int16": np.dtype(np.int16),
  "int8": np.dtype(np.int8), "uint8": np.dtype(np.uint8), "uint16": np.dtype(np.uint16),
  "uint32": np.dtype(np.uint32), "uint64": np.dtype(np.uint64), "bool": np.dtype(np.bool_),
  "complex64": np.dtype(np.complex64), "complex128": np.dtype(np.complex128),
  "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn), "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
  "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz), "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
}

_ML_DTYPES = {dt for dt in _TORCH_DTYPES.values() if dt.type.__module__.startswith("ml_dtypes")}

_SAFETENSORS_DTYPES = {
  "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": _BF16,
  "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
  "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8),
  "BOOL": np.dtype(np.bool_), "C64": np.dtype(np.complex64),
  "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a ``.safetensors`` file or a ``torch.save`` zip checkpoint into {name: array}, never importing torch.

  Keys keep the file's order. See the module docstring for dtypes and nested checkpoints.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise InputError(f"checkpoint not found: {path}")
  if os.path.isdir(path):
    raise InputError(f"checkpoint is a directory, not a file: {path}")
  with open(path, "rb") as f:
    head = f.read(16)
  if path.endswith(".safetensors") or _looks_like_safetensors(head):
    return _load_safetensors(path)
  if zipfile.is_zipfile(path):
    return _load_torch_zip(path)
  if head.startswith(b"PK"):
    raise InputError(f"corrupt or truncated checkpoint (broken zip archive): {path}")
  if head.startswith(b"\x80"):
    # A bare pickle: torch.save before PyTorch 1.6 (or with _use_new_zipfile_serialization=False), or plain pickle.
    raise InputError(f"{path} is in PyTorch's legacy (pre-1.6, non-zip) format or is a plain pickle; re-save it with "
                     "torch.save in PyTorch >= 1.6, or as .safetensors")
  raise InputError(f"not a PyTorch (.pt/.bin zip) or .safetensors checkpoint: {path}")


def save_torch_state_dict(state: Mapping[str, Any], path: str | os.PathLike) -> None:
  """Writes {name: array} as a ``torch.save`` OrderedDict of tensors (the official ``global_mapper.pt`` layout).

  The file loads with ``torch.load(path, map_location='cpu', weights_only=True)``. It is written to a temporary file
  next to ``path`` and renamed, so a crash never leaves a half-written checkpoint.
  """
  try:
    import torch  # noqa: PLC0415 - torch is optional: only this writer needs it
  except ImportError:
    raise InputError("exporting to .pt needs torch: pip install torch") from None
  tensors = collections.OrderedDict()
  for name, value in state.items():
    if not isinstance(name, str):
      raise InputError(f"state dict keys must be strings, got {name!r}")
    arr = np.asarray(value)
    if not arr.dtype.isnative:
      arr = arr.astype(arr.dtype.newbyteorder("="))  # torch.from_numpy takes native byte order only
    try:
      if arr.dtype in _ML_DTYPES:
        # torch.from_numpy knows no bfloat16/float8: move the bits as unsigned ints and reinterpret.
        bits = np.array(arr, order="C").view(np.uint16 if arr.dtype.itemsize == 2 else np.uint8)
        tensors[name] = torch.from_numpy(bits).view(getattr(torch, arr.dtype.name))
      else:
        tensors[name] = torch.from_numpy(np.array(arr, order="C"))
    except (TypeError, ValueError):
      raise InputError(f"cannot export {name!r}: dtype {arr.dtype} has no PyTorch equivalent") from None
  with atomic_path(path) as tmp, open(tmp, "xb") as f:
    torch.save(tensors, f)


# ----------------------------------------------------------------------------------------------------------------------
# safetensors


def _looks_like_safetensors(head: bytes) -> bool:
  # 8-byte little-endian header length, then the JSON header's opening brace.
  return len(head) >= 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 2**31


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
    if n < 2 or 8 + n > size:
      raise InputError(f"not a valid .safetensors file (bad header length): {path}")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
      raise InputError(f"not a valid .safetensors file (header is not JSON): {path}") from None
  if not isinstance(header, dict):
    raise InputError(f"not a valid .safetensors file (header is not a JSON object): {path}")
  start = 8 + n
  data = np.memmap(path, dtype=np.uint8, mode="r")
  out = {}
  try:
    for name, info in header.items():
      if name == "__metadata__":
        continue
      try:
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        shape = tuple(info["shape"])
        begin, end = info["data_offsets"]
      except (TypeError, KeyError, ValueError):
        raise InputError(f"not a valid .safetensors file (bad entry for {name!r}): {path}") from None
      if dtype is None:
        raise InputError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which is not supported")
      if (not all(isinstance(d, int) and d >= 0 for d in shape) or not isinstance(begin, int)
          or not isinstance(end, int) or not 0 <= begin <= end or start + end > size
          or end - begin != math.prod(shape) * dtype.itemsize):
        raise InputError(f"not a valid .safetensors file (tensor {name!r} does not fit its data): {path}")
      arr = np.array(data[start + begin:start + end].view(dtype).reshape(shape))  # a copy, detached from the map
      out[name] = arr.byteswap() if sys.byteorder == "big" else arr  # safetensors data is little-endian
  finally:
    del data
  return out


# ----------------------------------------------------------------------------------------------------------------------
# torch.save zip archives


class _StorageType:
  """Stands in for ``torch.FloatStorage`` & co. (dtype None: ``torch.storage.UntypedStorage``, raw bytes)."""

  __slots__ = ("dtype",)

  def __init__(self, dtype: np.dtype | None):
    self.dtype = dtype


class _Storage:
  """A ``data/<key>`` record: its dtype and size in bytes; the bytes are read only when tensors are built."""

  __slots__ = ("key", "dtype", "nbytes")

  def __init__(self, key: str, dtype: np.dtype, nbytes: int):
    self.key, self.dtype, self.nbytes = key, dtype, nbytes


class _TensorRef:
  """A tensor to be built later as a strided view of its storage (so storages are read one at a time)."""

  __slots__ = ("storage", "dtype", "offset", "size", "stride")

  def __init__(self, storage: _Storage, dtype: np.dtype, offset: int, size: Any, stride: Any):
    self.storage, self.dtype, self.offset, self.size, self.stride = storage, dtype, offset, size, stride


class _TorchDtype:
  __slots__ = ("dtype",)

  def __init__(self, dtype: np.dtype):
    self.dtype = dtype


_TENSOR_TYPE, _PARAMETER_TYPE = object(), object()  # torch.Tensor and nn.Parameter as _rebuild_from_type_v2 args


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
  if not isinstance(storage, _Storage) or storage.dtype is None:
    raise pickle.UnpicklingError("_rebuild_tensor_v2 without a typed storage")
  return _TensorRef(storage, storage.dtype, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
  if not isinstance(storage, _Storage) or not isinstance(dtype, _TorchDtype):
    raise pickle.UnpicklingError("_rebuild_tensor_v3 without a storage and a dtype")
  return _TensorRef(storage, dtype.dtype, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  return data  # an nn.Parameter is just its tensor here


def _rebuild_from_type_v2(func, new_type, args, state):
  # Tensor subclasses and tensors with Python attributes; only plain tensors and Parameters are accepted.
  if new_type not in (_TENSOR_TYPE, _PARAMETER_TYPE) or func not in (_rebuild_tensor_v2, _rebuild_tensor_v3):
    raise pickle.UnpicklingError("_rebuild_from_type_v2 of an unsupported type")
  return func(*args)


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
  ("collections", "OrderedDict"): collections.OrderedDict,
  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
  ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
  ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
  ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
  ("torch", "Tensor"): _TENSOR_TYPE,
  ("torch._tensor", "Tensor"): _TENSOR_TYPE,
  ("torch.nn.parameter", "Parameter"): _PARAMETER_TYPE,
  ("torch", "Size"): tuple,
  ("torch.storage", "UntypedStorage"): _StorageType(None),
  ("torch", "UntypedStorage"): _StorageType(None),
  **{("torch", name): _StorageType(dt) for name, dt in _STORAGE_DTYPES.items()},
  **{("torch", name): _TorchDtype(dt) for name, dt in _TORCH_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles a torch.save ``data.pkl`` knowing only the globals in _ALLOWED_GLOBALS; never imports anything."""

  def __init__(self, file, path: str):
    super().__init__(file)
    self._path = path
    self._storages: dict[str, _Storage] = {}

  def find_class(self, module: str, name: str) -> Any:
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise InputError(f"refusing to load {self._path}: its pickle asks for '{module}.{name}', which is not a tensor "
                       "or dict (only plain state dicts load without torch)") from None

  def persistent_load(self, pid: Any) -> _Storage:
    # ('storage', storage_type, key, location, numel): numel counts elements, or bytes for UntypedStorage.
    if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage" or not isinstance(pid[1], _StorageType)
        or not isinstance(pid[2], str) or not isinstance(pid[4], int) or pid[4] < 0):
      raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
    storage_type, key, numel = pid[1], pid[2], pid[4]
    if key not in self._storages:
      dtype = storage_type.dtype if storage_type.dtype is not None else np.dtype(np.uint8)
      self._storages[key] = _Storage(key, storage_type.dtype, numel * dtype.itemsize)
    return self._storages[key]


def _load_torch_zip(path: str) -> dict[str, np.ndarray]:
  try:
    with zipfile.ZipFile(path) as zf:
      names = zf.namelist()
      pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
      if len(pkls) != 1:
        raise InputError(f"not a PyTorch checkpoint (a zip without one <name>/data.pkl): {path}")
      prefix = pkls[0][:-len("data.pkl")]
      if prefix + "constants.pkl" in names:
        raise InputError(f"{path} is a TorchScript archive, not a state dict; save model.state_dict() instead")
      # Storages are little-endian unless a "byteorder" record says otherwise (old files have none).
      order = "little"
      if prefix + "byteorder" in names and zf.read(prefix + "byteorder").strip() == b"big":
        order = "big"
      with zf.open(pkls[0]) as f:
        try:
          obj = _RestrictedUnpickler(f, path).load()
        except InputError:
          raise
        except Exception as e:  # a broken pickle raises anything from EOFError to TypeError
          raise InputError(f"corrupt PyTorch checkpoint {path}: {type(e).__name__}: {e}") from None
      if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
      if not isinstance(obj, dict):
        what = "single tensor" if isinstance(obj, _TensorRef) else type(obj).__name__
        raise InputError(f"{path} holds a {what}, not a dict of tensors")
      refs: list[tuple[str, _TensorRef]] = []
      _collect_tensors(obj, "", refs)
      return _materialize(zf, prefix, order, refs, path)
  except (zipfile.BadZipFile, OSError, EOFError) as e:
    raise InputError(f"corrupt or truncated PyTorch checkpoint {path}: {e}") from None


def _collect_tensors(obj: dict, prefix: str, out: list) -> None:
  for key, value in obj.items():
    name = f"{prefix}{key}"
    if isinstance(value, _TensorRef):
      out.append((name, value))
    elif isinstance(value, dict):
      _collect_tensors(value, name + ".", out)


def _materialize(zf: zipfile.ZipFile, prefix: str, order: str, refs: list, path: str) -> dict[str, np.ndarray]:
  # Read each storage once, keep it only while tensors still need it (peak memory: the output + one storage).
  remaining = collections.Counter(ref.storage.key for _, ref in refs)
  cache: dict[str, bytes] = {}
  out = {}
  for name, ref in refs:
    key = ref.storage.key
    if key not in cache:
      try:
        cache[key] = zf.read(f"{prefix}data/{key}")
      except KeyError:
        raise InputError(f"corrupt PyTorch checkpoint {path}: storage data/{key} is missing") from None
      if len(cache[key]) < ref.storage.nbytes:
        raise InputError(f"corrupt or truncated PyTorch checkpoint {path}: storage data/{key} is too short")
    out[name] = _strided_copy(cache[key], ref.storage.nbytes, ref, order, f"{path}: tensor {name!r}")
    remaining[key] -= 1
    if remaining[key] == 0:
      del cache[key]
  return out


def _strided_copy(buf: bytes, nbytes: int, ref: _TensorRef, order: str, where: str) -> np.ndarray:
  dtype, offset, size, stride = ref.dtype, ref.offset, ref.size, ref.stride
  # Checked before as_strided, which would otherwise read outside the buffer for a malformed file.
  if (not isinstance(offset, int) or offset < 0 or not isinstance(size, tuple) or not isinstance(stride, tuple)
      or len(size) != len(stride) or not all(isinstance(v, int) and v >= 0 for v in size + stride)):
    raise InputError(f"{where} has an invalid offset/size/stride")
  if 0 in size:
    return np.zeros(size, dtype)
  numel = nbytes // dtype.itemsize
  if offset + sum((n - 1) * s for n, s in zip(size, stride)) >= numel:
    raise InputError(f"{where} reaches past the end of its storage")
  flat = np.frombuffer(buf, dtype=dtype, count=numel)
  view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size, strides=[s * dtype.itemsize for s in stride])
  out = np.array(view, order="C")  # own C-contiguous memory (also for views and shared storages)
  return out.byteswap() if order != sys.byteorder else out
