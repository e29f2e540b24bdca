"""elite_jax.weights.torch_files against real torch.save / safetensors files: values, dtypes, views, refusals."""

import collections
import io
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch

from elite_jax.errors import InputError
from elite_jax.weights.torch_files import load_state_dict, save_torch_state_dict


def _np(t: torch.Tensor) -> np.ndarray:
  """torch tensor -> numpy with the dtype load_state_dict promises (bf16 as ml_dtypes.bfloat16, bit-exact)."""
  t = t.detach()
  if t.dtype == torch.bfloat16:
    return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  if t.dtype == torch.float8_e4m3fn:
    return t.contiguous().view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
  return t.numpy()


def _assert_same(ours: dict, expected: dict) -> None:
  assert list(ours) == list(expected)
  for name, t in expected.items():
    want = _np(t)
    got = ours[name]
    assert type(got) is np.ndarray, name
    assert got.dtype == want.dtype and got.shape == want.shape, (name, got.dtype, got.shape, want.dtype, want.shape)
    assert got.tobytes() == np.ascontiguousarray(want).tobytes(), name  # bit-exact, NaN-safe


def _save(obj, path, **kw):
  torch.save(obj, path, **kw)
  return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                                   torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64,
                                   torch.float8_e4m3fn, torch.uint16])
def test_dtypes(tmp_path, dtype):
  g = torch.Generator().manual_seed(0)
  x = torch.randn(3, 5, generator=g) * 100
  if dtype == torch.bool:
    t = x > 0
  elif dtype.is_complex:
    t = torch.complex(x, -x).to(dtype)
  elif dtype == torch.uint16:
    t = x.abs().to(torch.int32).to(dtype)
  else:
    t = x.to(dtype)
  sd = {"x": t, "special": torch.tensor([float("nan"), float("inf"), -0.0]).to(dtype)} if dtype.is_floating_point \
    else {"x": t}
  ours = load_state_dict(_save(sd, tmp_path / "m.pt"))
  _assert_same(ours, sd)
  if dtype == torch.bfloat16:
    assert ours["x"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(ours["x"].astype(np.float32), t.float().numpy())


def test_views_and_shared_storage(tmp_path):
  base = torch.arange(48, dtype=torch.float32)
  m = base.view(6, 8)
  sd = collections.OrderedDict(
    transposed=m.t(),  # non-contiguous (stride (1, 8))
    rows=m[1:4],  # offset 8 into the shared storage
    cols=m[:, 2:7:2],  # offset 2, stride (8, 2)
    tail=base[40:],  # offset 40
    expanded=torch.ones(1, 3).expand(4, 3),  # stride 0
    perm=torch.arange(24.).view(2, 3, 4).permute(2, 0, 1),
    empty=torch.zeros(0, 3),
  )
  path = _save(sd, tmp_path / "v.pt")
  with zipfile.ZipFile(path) as zf:  # the first four share one storage record
    assert len([n for n in zf.namelist() if "/data/" in n]) == 4
  ours = load_state_dict(path)
  _assert_same(ours, {k: v.contiguous() for k, v in sd.items()})
  for v in ours.values():
    assert v.flags.c_contiguous and v.flags.writeable and v.flags.owndata
  ours["rows"][0, 0] = -1  # tensors that shared a storage must not alias after loading
  assert ours["transposed"][0, 1] == 8


def test_parameter_scalar_linear_ordered_dict(tmp_path):
  lin = torch.nn.Linear(4, 3)
  sd = lin.state_dict()  # an OrderedDict with a _metadata attribute
  path = _save(sd, tmp_path / "lin.pt")
  _assert_same(load_state_dict(path), sd)

  od = collections.OrderedDict([("z", torch.tensor(2.5)), ("a", torch.nn.Parameter(torch.randn(2, 2))),
                                ("m", torch.tensor(7, dtype=torch.int64))])
  ours = load_state_dict(_save(od, tmp_path / "od.pt"))
  _assert_same(ours, od)
  assert ours["z"].shape == () and ours["z"] == np.float32(2.5)

  # An official-style mapper file: torch.save(module.state_dict()) with nested Sequential keys.
  mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.LeakyReLU(), torch.nn.Linear(8, 4))
  _assert_same(load_state_dict(_save(mlp.state_dict(), tmp_path / "mapper.pt")), mlp.state_dict())


def test_nested_checkpoints(tmp_path):
  w = torch.randn(2, 3)
  ours = load_state_dict(_save({"state_dict": {"w": w}, "epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "a.pt"))
  _assert_same(ours, {"w": w})
  ours = load_state_dict(_save({"model": {"enc": {"w": w}}, "step": 5, "name": "x", "extra": [w]}, tmp_path / "b.pt"))
  _assert_same(ours, {"model.enc.w": w})


def test_safetensors(tmp_path):
  import safetensors.numpy
  import safetensors.torch
  g = torch.Generator().manual_seed(1)
  sd = {"f32": torch.randn(3, 4, generator=g), "f16": torch.randn(5, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(), "i64": torch.arange(6).view(2, 3),
        "b": torch.tensor([True, False]), "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 2)}
  path = tmp_path / "m.safetensors"
  safetensors.torch.save_file(sd, str(path), metadata={"format": "pt"})
  ours = load_state_dict(path)
  assert set(ours) == set(sd)
  _assert_same({k: ours[k] for k in sd}, sd)
  # Same as safetensors' own numpy loader where that one works (a bfloat16 tensor makes it fail on the whole file).
  no_bf16 = {k: v for k, v in sd.items() if k != "bf16"}
  safetensors.torch.save_file(no_bf16, str(tmp_path / "n.safetensors"))
  ref = safetensors.numpy.load_file(str(tmp_path / "n.safetensors"))
  ours = load_state_dict(tmp_path / "n.safetensors")
  for k, v in ref.items():
    assert ours[k].dtype == v.dtype and np.array_equal(ours[k], v)
  # Detected by content even without the extension.
  os.replace(tmp_path / "n.safetensors", tmp_path / "n.bin")
  assert set(load_state_dict(tmp_path / "n.bin")) == set(no_bf16)


def test_save_round_trip(tmp_path):
  import jax.numpy as jnp
  rng = np.random.default_rng(0)
  state = collections.OrderedDict(
    [("mapping_0.0.weight", rng.standard_normal((6, 4)).astype(np.float32)),
     ("mapping_0.0.bias", rng.standard_normal(6).astype(np.float16)),
     ("t", rng.standard_normal((4, 5)).astype(np.float32).T),  # non-contiguous numpy view
     ("bf", rng.standard_normal(3).astype(ml_dtypes.bfloat16)),
     ("i", np.arange(4, dtype=np.int64)), ("b", np.array([True, False])), ("s", np.float32(3.0)),
     ("j", jnp.arange(3, dtype=jnp.float32)), ("be", np.arange(3, dtype=">f4"))])
  path = tmp_path / "out" / "global_mapper.pt"
  save_torch_state_dict(state, path)
  save_torch_state_dict(state, path)  # overwriting is fine
  assert os.listdir(tmp_path / "out") == ["global_mapper.pt"]  # no temp file left behind
  loaded = torch.load(path, map_location="cpu", weights_only=True)
  assert isinstance(loaded, collections.OrderedDict) and list(loaded) == list(state)
  for k, v in state.items():
    want = np.asarray(v)
    want = want.astype(want.dtype.newbyteorder("="))
    assert loaded[k].shape == want.shape
    assert _np(loaded[k]).dtype == want.dtype and _np(loaded[k]).tobytes() == np.ascontiguousarray(want).tobytes()
  back = load_state_dict(path)
  assert list(back) == list(state)
  for k, v in state.items():
    assert back[k].dtype == np.asarray(v).dtype.newbyteorder("=") and np.array_equal(back[k], np.asarray(v))
  with pytest.raises(InputError, match="'x'"):
    save_torch_state_dict({"x": np.array(["a"])}, tmp_path / "bad.pt")
  assert not (tmp_path / "bad.pt").exists()


class _Evil:
  def __reduce__(self):
    return os.system, (f"touch {_Evil.marker}",)


def _zip(path, pkl: bytes, records: dict | None = None):
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", pkl)
    zf.writestr("archive/byteorder", "little")
    for k, v in (records or {}).items():
      zf.writestr(f"archive/data/{k}", v)
  return path


def test_malicious_pickle_is_refused(tmp_path):
  marker = tmp_path / "pwned"
  _Evil.marker = marker
  with pytest.raises(InputError, match="system"):
    load_state_dict(_save({"w": torch.ones(2), "x": _Evil()}, tmp_path / "evil.pt"))
  with pytest.raises(InputError, match="system"):
    load_state_dict(_zip(tmp_path / "evil2.pt", pickle.dumps({"x": _Evil()}, protocol=2)))
  with pytest.raises(InputError, match="builtins.eval"):
    load_state_dict(_zip(tmp_path / "evil3.pt", b"cbuiltins\neval\n(S'1+1'\ntR."))
  assert not marker.exists()
  pickle.loads(pickle.dumps(_Evil()))  # the payload is live: a plain unpickler does run it
  assert marker.exists()
  # Harmless but unknown classes are refused the same way (weights-only, like torch.load(weights_only=True)).
  import argparse
  with pytest.raises(InputError, match="argparse.Namespace"):
    load_state_dict(_save({"w": torch.ones(1), "args": argparse.Namespace(a=1)}, tmp_path / "args.pt"))


class _FakeTensor:
  """Pickles like a torch tensor whose size/stride/offset we choose, to build malformed checkpoints."""

  def __init__(self, offset, size, stride):
    self.args = offset, size, stride

  def __reduce__(self):
    return torch._utils._rebuild_tensor_v2, (_STORAGE,) + self.args + (False, collections.OrderedDict())


_STORAGE = object()


class _Pickler(pickle.Pickler):
  def persistent_id(self, obj):
    return ("storage", torch.FloatStorage, "0", "cpu", 4) if obj is _STORAGE else None


def _fake_ckpt(path, tensor, nbytes=16):
  buf = io.BytesIO()
  _Pickler(buf, protocol=2).dump({"w": tensor})
  return _zip(path, buf.getvalue(), {"0": np.arange(nbytes // 4, dtype=np.float32).tobytes()})


def test_hand_built_checkpoints(tmp_path):
  ours = load_state_dict(_fake_ckpt(tmp_path / "ok.pt", _FakeTensor(1, (2, 2), (1, 1))))
  np.testing.assert_array_equal(ours["w"], [[1, 2], [2, 3]])  # overlapping strides are legal in torch
  with pytest.raises(InputError, match="past the end"):
    load_state_dict(_fake_ckpt(tmp_path / "oob.pt", _FakeTensor(2, (3,), (1,))))
  with pytest.raises(InputError, match="past the end"):
    load_state_dict(_fake_ckpt(tmp_path / "oob2.pt", _FakeTensor(0, (2, 2), (4, 1))))
  with pytest.raises(InputError, match="invalid offset"):
    load_state_dict(_fake_ckpt(tmp_path / "neg.pt", _FakeTensor(0, (2,), (-1,))))
  with pytest.raises(InputError, match="too short"):
    load_state_dict(_fake_ckpt(tmp_path / "short.pt", _FakeTensor(0, (2,), (1,)), nbytes=8))


def test_bad_files(tmp_path):
  with pytest.raises(InputError, match="not found: .*nope.pt"):
    load_state_dict(tmp_path / "nope.pt")
  with pytest.raises(InputError, match="directory"):
    load_state_dict(tmp_path)
  (tmp_path / "notes.txt").write_text("hello, not a checkpoint\n")
  with pytest.raises(InputError, match="not a PyTorch .*notes.txt"):
    load_state_dict(tmp_path / "notes.txt")
  (tmp_path / "empty.pt").write_bytes(b"")
  with pytest.raises(InputError, match="empty.pt"):
    load_state_dict(tmp_path / "empty.pt")
  good = _save({"w": torch.randn(64, 64)}, tmp_path / "good.pt").read_bytes()
  for n, cut in enumerate([len(good) // 2, len(good) - 10, 100]):
    (tmp_path / f"cut{n}.pt").write_bytes(good[:cut])
    with pytest.raises(InputError, match=f"cut{n}.pt"):
      load_state_dict(tmp_path / f"cut{n}.pt")
  with pytest.raises(InputError, match="legacy"):
    load_state_dict(_save({"w": torch.ones(2)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False))
  (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"a": 1}))
  with pytest.raises(InputError, match="legacy"):
    load_state_dict(tmp_path / "plain.pkl")
  with zipfile.ZipFile(tmp_path / "other.zip", "w") as zf:
    zf.writestr("readme.txt", "hi")
  with pytest.raises(InputError, match="not a PyTorch checkpoint"):
    load_state_dict(tmp_path / "other.zip")
  with pytest.raises(InputError, match="single tensor"):
    load_state_dict(_save(torch.ones(3), tmp_path / "tensor.pt"))
  st = tmp_path / "bad.safetensors"
  st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
  with pytest.raises(InputError, match="bad.safetensors"):
    load_state_dict(st)
  import safetensors.torch
  safetensors.torch.save_file({"w": torch.randn(16, 16)}, str(tmp_path / "t.safetensors"))
  data = (tmp_path / "t.safetensors").read_bytes()
  (tmp_path / "t.safetensors").write_bytes(data[:-100])
  with pytest.raises(InputError, match="does not fit"):
    load_state_dict(tmp_path / "t.safetensors")
