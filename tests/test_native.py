"""The native CPU attention kernel (elite_jax/native): built on this machine for every vector width and every
instruction set it can run, against the plain formula in float64; chosen by the "cpu" implementation for float32
where its self-check (selfcheck.py) found it faster; left for the XLA forms when it cannot be built or is slower."""

import os
import subprocess
import sys

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elite_jax import native
from elite_jax.errors import InputError
from elite_jax.models import attention
from elite_jax.native import selfcheck
from tests.test_attention import _rel, plain


def _qkv(b, lq, lk, h, d, dv, seed=0, spread=1.0):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, lq, h, d)) * spread
  k = rng.standard_normal((b, lk, h, d))
  v = rng.standard_normal((b, lk, h, dv))
  return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v))


def test_builds_here():
  """CI machines have a C++ compiler: the kernel must build there, so the tests below run the kernel itself."""
  assert native.kernel() is not None, native._default()


# (batch, queries, keys, heads, width, value width): SD's 40-wide heads over 4 key tiles (the online softmax
# rescales 3 times) with a partial last tile; queries that leave a partial block; a 77-token cross-attention;
# 8-wide heads (the small UNet); values narrower than keys and not a multiple of 4 channels; one key; 4096 keys of
# 40 + 40 floats, 1.25 MiB a head, which the kernel copies to rows of their own by itself (over 1 MiB).
CASES = [(2, 512, 512, 2, 40, 40), (1, 100, 300, 3, 40, 40), (2, 256, 77, 2, 160, 160), (2, 64, 1024, 8, 8, 8),
         (1, 70, 13, 2, 24, 7), (1, 5, 1, 1, 16, 16), (1, 40, 4096, 2, 40, 40)]


def _check_formula(fn, b, lq, lk, h, d, dv):
  q, k, v = _qkv(b, lq, lk, h, d, dv, spread=3.0)  # large scores: a wrong running max would show
  got, lse = jax.jit(fn)(q, k, v)
  assert got.shape == (b, lq, h, dv) and lse.shape == (b, h, lq)
  assert _rel(got, plain(q, k, v, False)) < 2e-6
  s = np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64), np.asarray(k, np.float64)) / np.sqrt(d)
  want = s.max(-1) + np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1))
  assert np.abs(np.asarray(lse, np.float64) - want).max() < 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("b,lq,lk,h,d,dv", CASES)
def test_fused_matches_the_plain_formula(b, lq, lk, h, d, dv):
  _check_formula(native.attention, b, lq, lk, h, d, dv)


@pytest.mark.parametrize("width", native.WIDTHS)
def test_every_vector_width_matches_the_plain_formula(width):
  """4, 8 and 16 floats per vector, each forced on this machine's target (a width it lacks is slow, not wrong)."""
  kernel = native.load(width=width)
  assert kernel.width == width and kernel.queries % width == 0
  for case in CASES:
    _check_formula(kernel, *case)


@pytest.mark.parametrize("copy", [False, True])
def test_heads_copied_or_read_in_place_match_the_plain_formula(copy):
  """Each head's keys and values read where they are, or copied to rows of their own first (what the kernel does by
  itself for long sequences: 4096 keys x 40 + 40 widths below), both forced."""
  kernel = native.load(copy=copy)
  assert kernel.copy == int(copy) and native.kernel().copy == -1
  for case in CASES:
    _check_formula(kernel, *case)


# The width each named target must pick by itself on x86-64 (generic: SSE2).
X86_WIDTHS = {"x86-64-v3": 8, "x86-64-v4": 16, "generic": 4}


@pytest.mark.parametrize("target", [a for a in native.ARCHS if a != "native"])
def test_every_instruction_set_this_cpu_runs_builds_and_matches(target):
  if target not in native.supported_archs():
    pytest.skip(f"this CPU cannot run {target} code ({native.cpu_info()['model']})")
  kernel = native.load(target)
  if os.uname().machine == "x86_64":
    assert kernel.width == X86_WIDTHS[target], kernel
  for case in CASES:
    _check_formula(kernel, *case)


def test_cpu_implementation_runs_the_kernel_forward_and_backward(monkeypatch):
  monkeypatch.setenv(native.MODE_ENV, "1")  # the kernel whatever this machine's self-check chose
  q, k, v = _qkv(2, 256, 256, 2, 40, 40, seed=1)
  f = lambda q, k, v: attention.dot_product_attention(q, k, v, implementation="cpu")  # noqa: E731
  assert native.ATTENTION_TARGET in jax.jit(f).lower(q, k, v).as_text()
  assert native.ATTENTION_TARGET in jax.jit(jax.grad(lambda *a: f(*a).sum())).lower(q, k, v).as_text()
  bf = tuple(x.astype(jnp.bfloat16) for x in (q, k, v))  # other dtypes keep the XLA form
  assert native.ATTENTION_TARGET not in jax.jit(f).lower(*bf).as_text()


# The backward pass's blocks: whole heads in groups of two (of 4), and 32-query chunks whose dk and dv add up; keys
# and values of other widths than the queries'.
@pytest.mark.parametrize("block_bytes,dv", [(256 * 4 * 256 * 2, 40), (256 * 4 * 32, 24)])
def test_gradient_matches_autodiff_of_the_formula(block_bytes, dv):
  q, k, v = _qkv(2, 256, 256, 2, 40, dv, seed=3, spread=2.0)
  weights = jnp.asarray(np.random.default_rng(4).standard_normal(q.shape[:-1] + (dv,)), jnp.float32)

  def ref(q, k, v):
    p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") / np.sqrt(q.shape[-1]), -1)
    return jnp.sum(jnp.einsum("bhqk,bkhd->bqhd", p, v, precision="highest") * weights)

  out, lse = native.attention(q, k, v)
  g = jnp.broadcast_to(weights, out.shape)
  got = jax.jit(lambda *a: attention._cpu_fused_grad(*a, block_bytes, block_bytes))(q, k, v, out, lse, g)
  want = jax.grad(ref, argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(got, want):
    assert _rel(a, b) < 1e-5
  default = jax.grad(lambda *a: jnp.sum(attention._cpu_fused(*a) * weights), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(default, want):
    assert _rel(a, b) < 1e-5


def test_batched_by_vmap():
  q, k, v = _qkv(6, 96, 80, 2, 16, 16, seed=2)
  split = lambda x: x.reshape(3, 2, *x.shape[1:])  # noqa: E731
  got = jax.jit(jax.vmap(native.attention))(split(q), split(k), split(v))[0].reshape(6, 96, 2, 16)
  assert _rel(got, plain(q, k, v, False)) < 2e-6


def test_built_once_per_key(tmp_path, monkeypatch):
  monkeypatch.setenv(native.DIR_ENV, str(tmp_path))
  path = native.build()
  assert os.path.dirname(path) == str(tmp_path) and os.listdir(tmp_path) == [os.path.basename(path)]
  stamp = os.stat(path).st_mtime_ns
  assert native.build() == path and os.stat(path).st_mtime_ns == stamp


def test_a_failed_build_names_the_problem(tmp_path, monkeypatch):
  monkeypatch.setenv(native.DIR_ENV, str(tmp_path))
  monkeypatch.setenv("CXX", "false")  # a "compiler" that fails: no library, no temporary file left behind
  with pytest.raises(RuntimeError, match="false failed"):
    native.build()
  assert os.listdir(tmp_path) == []


def test_the_self_check_decides_by_every_shape():
  assert selfcheck.decide([1.0, 2.0], [1.5, 2.0])  # as fast or faster everywhere
  assert not selfcheck.decide([1.0, 2.1], [3.0, 2.0])  # slower on one shape: the XLA form, however fast elsewhere


def _fake_kernel(tmp_path, arch="native", width=16):
  return native.Kernel(str(tmp_path / f"attention_cpu-{arch}-0123456789abcdef.so"), "t", arch, width, 96, 64, -1)


@pytest.mark.parametrize("kernel_ms,use", [(1.0, True), (3.0, False)])
def test_the_self_check_is_measured_once_and_cached(tmp_path, kernel_ms, use):
  """Forced timings (the kernel fast, then slow, against an XLA form at 2 ms): the choice follows them, is written
  next to the library, and a later process reads it instead of timing again."""
  kernel = _fake_kernel(tmp_path)
  calls = []

  def timer(ks):
    calls.append(ks)
    return [[kernel_ms] * len(selfcheck.SHAPES)], [2.0] * len(selfcheck.SHAPES)
  got = selfcheck.choose(kernel, timer, builds=[kernel])
  assert got.use_kernel is use and got.source == "measured now" and calls == [[kernel]] and got.arch == "native"
  with open(selfcheck.cache_path(kernel)) as f:
    assert json.load(f)["use_kernel"] is use
  again = selfcheck.choose(kernel, lambda ks: pytest.fail("timed again"))
  assert again.use_kernel is use and again.source.startswith("cached in ") and again.kernel_ms == got.kernel_ms
  summary = again.summary(kernel)
  assert ("the fused kernel" if use else "the XLA form") in summary and f"{2.0 / kernel_ms:.2f}" in summary


def test_the_self_check_picks_the_faster_build():
  """Of the builds at least as fast as the XLA form on every shape, the one fastest against it overall."""
  xla = [2.0, 2.0]
  assert selfcheck.pick([[1.0, 1.0], [0.5, 0.9]], xla) == 1  # the second faster everywhere
  assert selfcheck.pick([[1.0, 1.0], [0.5, 2.1]], xla) == 0  # the second slower than XLA on one shape: never
  assert selfcheck.pick([[0.5, 1.9], [1.5, 1.0]], xla) == 0  # geometric mean 0.49 against 0.61 of the XLA form
  assert selfcheck.pick([[3.0, 1.0], [1.0, 3.0]], xla) is None  # none everywhere: the XLA form


@pytest.mark.parametrize("v3_ms,chosen", [(0.5, "x86-64-v3"), (1.5, "native"), (2.5, "native")])
def test_the_self_check_chooses_between_builds_and_caches_it(tmp_path, v3_ms, chosen):
  """Forced timings for a 16-float native build (1 ms) and the AVX2 build, against the XLA form at 2 ms: the faster
  build is chosen, cached with the other's figures, and read back as it was written."""
  default, v3 = _fake_kernel(tmp_path), _fake_kernel(tmp_path, "x86-64-v3", 8)
  n = len(selfcheck.SHAPES)
  got = selfcheck.choose(default, lambda ks: ([[1.0] * n, [v3_ms] * n], [2.0] * n), builds=[default, v3])
  assert got.use_kernel and got.arch == chosen and got.kernel_ms == ((v3_ms if chosen == "x86-64-v3" else 1.0),) * n
  other = "native" if chosen == "x86-64-v3" else "x86-64-v3"
  assert [arch for arch, _ in got.others] == [other]
  again = selfcheck.choose(default, lambda ks: pytest.fail("timed again"))
  assert (again.arch, again.kernel_ms, again.others) == (got.arch, got.kernel_ms, got.others)
  assert f"the {other} build" in again.summary(v3 if chosen == "x86-64-v3" else default)
  if chosen == "native":
    assert selfcheck.chosen_build(again, default) is default


def test_the_avx2_build_is_timed_beside_a_16_float_native_one():
  kernel = native.kernel()
  archs = [k.arch for k in selfcheck.candidates(kernel)]
  wide = kernel.arch == "native" and kernel.width == 16 and "x86-64-v3" in native.supported_archs()
  assert archs == (["native", "x86-64-v3"] if wide else [kernel.arch])
  narrow = native.Kernel(kernel.path, kernel.target, "native", 8, 32, 64, -1)  # an AVX2 CPU's native build
  assert selfcheck.candidates(narrow) == [narrow]


@pytest.mark.parametrize("old", [{"shapes": [[1, 2, 3, 4, 5]]}, {"shapes": list(map(list, selfcheck.SHAPES))}])
def test_a_cache_from_other_shapes_or_builds_is_measured_again(tmp_path, old):
  """A cache of other shapes, or of an elite_jax that timed one build only (no "arch"), is measured again."""
  kernel = _fake_kernel(tmp_path)
  with open(selfcheck.cache_path(kernel), "w") as f:
    json.dump({"use_kernel": False, "kernel_ms": [1] * 4, "xla_ms": [1] * 4, **old}, f)
  n = len(selfcheck.SHAPES)
  got = selfcheck.choose(kernel, lambda ks: ([[1.0] * n], [2.0] * n), builds=[kernel])
  assert got.use_kernel and got.source == "measured now"


def test_the_self_check_times_both_forms():
  (ms_kernel,), ms_xla = selfcheck.measure([native.kernel()], shapes=((1, 64, 80, 2, 8),), reps=1)
  assert len(ms_kernel) == len(ms_xla) == 1 and ms_kernel[0] > 0 and ms_xla[0] > 0


def test_a_chosen_build_that_cannot_be_built_falls_back_to_the_default():
  default = native.kernel()
  got = selfcheck.Choice(True, (), (), (), "test", "no-such-cpu")  # -march=no-such-cpu: the compiler refuses it
  assert selfcheck.chosen_build(got, default) is default


@pytest.mark.skipif("x86-64-v3" not in native.supported_archs(), reason="this CPU does not run AVX2 code")
def test_auto_calls_the_build_the_self_check_chose(monkeypatch):
  """Where the self-check chose the AVX2 build, the "cpu" attention calls that build's FFI target, not the
  default one's."""
  monkeypatch.setenv(native.MODE_ENV, "auto")
  v3 = native.load("x86-64-v3")
  monkeypatch.setattr(selfcheck, "choice", lambda: selfcheck.Choice(True, (), (), (), "test", "x86-64-v3"))
  assert native.active() is v3
  x = jnp.ones((1, 64, 2, 8))
  text = jax.jit(lambda x: attention.dot_product_attention(x, x, x, implementation="cpu")).lower(x).as_text()
  assert v3.target in text and (v3.target == native.kernel().target or native.kernel().target not in text)
  out = jax.jit(lambda x: attention.dot_product_attention(x, x, x, implementation="cpu"))(x)
  np.testing.assert_allclose(np.asarray(out), np.ones((1, 64, 2, 8)), rtol=1e-6)


@pytest.mark.parametrize("use", [True, False])
def test_auto_follows_the_self_check(monkeypatch, use):
  monkeypatch.setenv(native.MODE_ENV, "auto")
  monkeypatch.setattr(selfcheck, "choice", lambda: selfcheck.Choice(use, (), (), (), "test"))
  x = jnp.ones((1, 64, 2, 8))
  text = jax.jit(lambda x: attention.dot_product_attention(x, x, x, implementation="cpu")).lower(x).as_text()
  assert (native.ATTENTION_TARGET in text) is use


def test_a_bad_mode_names_the_problem(monkeypatch):
  monkeypatch.setenv(native.MODE_ENV, "fast")
  with pytest.raises(InputError, match="ELITE_JAX_NATIVE='fast' is not one of auto, 1, 0"):
    native.available()


def test_the_report_command_measures_then_reads_the_cache(tmp_path):
  """``python -m elite_jax.native`` in a fresh folder: it builds, runs the real self-check, writes the choice; the
  second run reads it. (Which form wins is this machine's business; that one is chosen is not.)"""
  env = dict(os.environ, **{native.DIR_ENV: str(tmp_path), native.MODE_ENV: "auto"})
  reports = []
  for _ in range(2):
    done = subprocess.run([sys.executable, "-m", "elite_jax.native"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    reports.append(json.loads(done.stdout.strip().splitlines()[-1]))
  first, second = reports
  assert first["summary"].endswith("measured now") and "cached in" in second["summary"]
  assert first["use_kernel"] == second["use_kernel"] == selfcheck.decide(first["kernel_ms"], first["xla_ms"])
  assert len(first["kernel_ms"]) == len(selfcheck.SHAPES) and first["kernel"].startswith("native, ")
  library = os.path.basename(first["library"])[:-len(".so")]
  files = {library + end for end in (".so", ".choice.json", ".choice.json.lock")}
  chosen = os.path.basename(first["chosen_library"])
  assert first["chosen"].startswith(("native, ", "x86-64-v3, ")) and chosen in os.listdir(tmp_path)
  if "16 floats" in first["kernel"]:  # the AVX2 build beside it, which the self-check timed too
    files.add(os.path.basename(native.build("x86-64-v3")))
  assert set(os.listdir(tmp_path)) == files


@pytest.mark.parametrize("env", [{"CXX": "false"}, {native.OFF_ENV: "0"}])
def test_without_the_kernel_cpu_attention_keeps_the_xla_form(tmp_path, env):
  """A failed build warns once and falls back; ELITE_JAX_NATIVE=0 falls back silently. Both in a fresh process (the
  kernel registers once per process)."""
  code = ("import warnings, jax, jax.numpy as jnp\n"
          "from elite_jax.models import attention\n"
          "x = jnp.ones((1, 64, 2, 8))\n"
          "f = lambda x: attention.dot_product_attention(x, x, x, implementation='cpu')\n"
          "with warnings.catch_warnings(record=True) as w:\n"
          "  warnings.simplefilter('always')\n"
          "  text = jax.jit(f).lower(x).as_text(); f(x); f(x)\n"
          "print('kernel' if 'elite_cpu_attention' in text else 'xla', len(w), *[str(m.message) for m in w])\n")
  environ = dict(os.environ, **env, **{native.DIR_ENV: str(tmp_path)})
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=300)
  assert done.returncode == 0, done.stderr
  if "CXX" in env:
    assert done.stdout.startswith("xla 1 elite_jax: native CPU kernels unavailable (false failed"), done.stdout
  else:
    assert done.stdout.strip() == "xla 0", done.stdout


def test_sharded_by_batch_and_heads_without_gathering():
  """On a (data, tensor) mesh each device runs the kernel on its own batch rows and heads."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((2, 4), ("data", "tensor"), devices=jax.devices()[:8])
  q, k, v = (jax.device_put(x, NamedSharding(mesh, P("data", None, "tensor"))) for x in _qkv(4, 64, 48, 8, 8, 8, 5))
  f = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, implementation="cpu"))
  text = f.lower(q, k, v).compile().as_text()
  assert "all-gather" not in text and "f32[2,64,2,8]" in text  # a quarter of the heads, half the batch each
  got = f(q, k, v)
  assert tuple(got.sharding.spec)[:3] == ("data", None, "tensor") and _rel(got, plain(q, k, v, False)) < 2e-6
