"""The persistent compilation cache that the binaries turn on (jaxinf.runtime), checked in subprocesses so that
this test process's jax configuration is never changed."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PROBE = r"""
import json, os, jax, jax.numpy as jnp
from jaxinf import runtime
path = runtime.setup()
f = jax.jit(lambda x: jnp.sin(x) @ x.T + 1.0)
f(jnp.ones((7, 5))).block_until_ready()
print(json.dumps({"path": path, "config": jax.config.jax_compilation_cache_dir}))
"""


def _probe(env):
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", **env), check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_cache_dir_from_env_var_is_written_and_reused(tmp_path):
    cache = tmp_path / "cache"
    out = _probe({"JAXINF_COMPILATION_CACHE": str(cache)})
    assert out["path"] == str(cache) and out["config"] == str(cache)
    entries = sorted(os.listdir(cache))
    assert entries, "the jitted function was not written to the cache"
    _probe({"JAXINF_COMPILATION_CACHE": str(cache)})  # a second process reuses, adds nothing new
    assert sorted(os.listdir(cache)) == entries


def test_cache_off_and_default_location(tmp_path):
    out = _probe({"JAXINF_COMPILATION_CACHE": "0", "XDG_CACHE_HOME": str(tmp_path)})
    assert out["path"] is None and out["config"] is None
    assert not (tmp_path / "jaxinf").exists()
    env = {k: v for k, v in os.environ.items() if k not in ("JAXINF_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True, text=True, check=True,
                          env=dict(env, JAX_PLATFORMS="cpu", XDG_CACHE_HOME=str(tmp_path)))
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["path"] == str(tmp_path / "jaxinf" / "jax")
    assert os.listdir(tmp_path / "jaxinf" / "jax")


def test_importing_the_library_turns_nothing_on():
    code = ("import jax, jaxinf.runtime, jaxinf.study, jaxinf.attribution, jaxinf.curvature; "
            "print(jax.config.jax_compilation_cache_dir)")
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                          env=dict(env, JAX_PLATFORMS="cpu"))
    assert proc.stdout.strip() == "None"


_FLAGS_PROBE = r"""
import json, os, jax, jax.numpy as jnp
from jaxinf import runtime
added = runtime.add_cpu_compile_flags()
jnp.ones(3).block_until_ready()
late = runtime.add_cpu_compile_flags()
print(json.dumps({"added": list(added), "xla_flags": os.environ.get("XLA_FLAGS", ""), "late": list(late)}))
"""


def _flags_probe(code=_FLAGS_PROBE, **env):
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXINF_XLA_FLAGS")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                          env={**base, "JAX_PLATFORMS": "cpu", **env})
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_cpu_compile_flags_are_added_once_and_yield_to_the_caller():
    from jaxinf import runtime

    out, _ = _flags_probe()
    assert out["added"] == list(runtime.CPU_COMPILE_FLAGS)
    assert out["xla_flags"].split() == list(runtime.CPU_COMPILE_FLAGS)
    assert out["late"] == []  # already there: nothing added twice
    out, _ = _flags_probe(XLA_FLAGS="--xla_backend_optimization_level=3")  # the caller's value wins
    assert out["xla_flags"].split() == ["--xla_backend_optimization_level=3", runtime.CPU_COMPILE_FLAGS[0]]
    out, _ = _flags_probe(JAXINF_XLA_FLAGS="0")
    assert out["added"] == [] and out["xla_flags"] == ""
    code = "import json; from jaxinf import runtime; print(json.dumps({'added': runtime.add_cpu_compile_flags()}))"
    out, _ = _flags_probe(code, JAX_PLATFORMS="cuda,cpu")  # an accelerator may run: its compiler is left alone
    assert out["added"] == []


def test_cpu_compile_flags_after_the_backend_started_warn():
    code = ("import jax.numpy as jnp, warnings; from jaxinf import runtime; jnp.ones(2).block_until_ready(); "
            "warnings.simplefilter('error'); runtime.add_cpu_compile_flags()")
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXINF_XLA_FLAGS")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env=dict(base, JAX_PLATFORMS="cpu"))
    assert proc.returncode != 0 and "cannot take effect" in proc.stderr
