"""Process-level settings the experiment binaries share; nothing here runs at import time.

The persistent compilation cache: XLA programs compiled by one run are written to a directory and reused by the
next run of the same program (same shapes, same jax/jaxlib, same backend), so a warm rerun skips the 9-15 s of
compilation per phase that a cold run pays. `setup()` turns it on for a binary's process, under

    $JAXINF_COMPILATION_CACHE                     if set to a path,
    nothing (cache off)                           if set to 0 / off / false / none / "",
    the directory jax was already given           if JAX_COMPILATION_CACHE_DIR or jax.config set one,
    $XDG_CACHE_HOME/jaxinf/jax   (default ~/.cache/jaxinf/jax)  otherwise.

Cheaper XLA compilation on the CPU: `setup()` also appends `CPU_COMPILE_FLAGS` to $XLA_FLAGS when jax runs on the
CPU only (no GPU/TPU plugin installed, or JAX_PLATFORMS=cpu) and no backend exists yet:

    --xla_cpu_use_fusion_emitters=false     XLA's older loop-fusion code generator, not the MLIR fusion emitters
    --xla_backend_optimization_level=1      LLVM at -O1 for the elementwise fusions (the default is -O2)

The model's programs compile in 0.4-0.7 of XLA's default time and run no slower (SmolLM2 LoRA gradient: 2.47 ->
1.00 s; `experiments.bench_compile_programs`), though many tiny per-leaf loops compile slower under the older
emitter (an optax update over 120 LoRA leaves: 0.34 -> 1.13 s). README command 1: results/benchmarks.md. Results
can differ from those under the default flags by float32 rounding (other loop code).
`$JAXINF_XLA_FLAGS=0` turns this off; a flag already named in $XLA_FLAGS keeps the caller's value.

Library code never calls this: importing jaxinf changes no global jax setting.

`provenance(argv)`: what a results file needs to say where it came from (command, git commit, machine).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shlex
import subprocess
from typing import Optional, Sequence

import jax

ENV_VAR = "JAXINF_COMPILATION_CACHE"
FLAGS_ENV_VAR = "JAXINF_XLA_FLAGS"
CPU_COMPILE_FLAGS = ("--xla_cpu_use_fusion_emitters=false", "--xla_backend_optimization_level=1")
_OFF = ("0", "off", "false", "no", "none", "")


def default_cache_dir() -> str:
    """$XDG_CACHE_HOME/jaxinf/jax, with XDG_CACHE_HOME defaulting to ~/.cache."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "jaxinf", "jax")


def compilation_cache_dir() -> Optional[str]:
    """The directory `setup()` will use for the persistent compilation cache, or None when it is turned off."""
    value = os.environ.get(ENV_VAR)
    if value is not None:
        return None if value.strip().lower() in _OFF else os.path.abspath(os.path.expanduser(value))
    return jax.config.jax_compilation_cache_dir or default_cache_dir()


def _cpu_only() -> bool:
    """Whether jax will run on the CPU alone: JAX_PLATFORMS (or jax.config) says only cpu, or no accelerator
    plugin (a `jax_plugins` package, libtpu) is installed."""
    platforms = (jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS") or "").strip().lower()
    if platforms:
        return [p.strip() for p in platforms.split(",")] == ["cpu"]
    return importlib.util.find_spec("jax_plugins") is None and importlib.util.find_spec("libtpu") is None


def _backends_started() -> bool:
    from jax._src import xla_bridge  # no public API says whether the backends exist yet

    return bool(getattr(xla_bridge, "backends_are_initialized", lambda: True)())


def add_cpu_compile_flags() -> tuple[str, ...]:
    """Append `CPU_COMPILE_FLAGS` to $XLA_FLAGS for this process and its children (module docstring); returns the
    flags added. Adds nothing when $JAXINF_XLA_FLAGS is 0 / off, when jax may use an accelerator, for a flag the
    caller already set, or once jax's backends exist (XLA reads $XLA_FLAGS when the first backend starts; a
    warning then says the flags came too late)."""
    if os.environ.get(FLAGS_ENV_VAR, "1").strip().lower() in _OFF or not _cpu_only():
        return ()
    current = os.environ.get("XLA_FLAGS", "")
    named = {token.split("=", 1)[0] for token in current.split()}
    missing = tuple(f for f in CPU_COMPILE_FLAGS if f.split("=", 1)[0] not in named)
    if not missing:
        return ()
    if _backends_started():
        import warnings

        warnings.warn(f"jaxinf.runtime: jax's backend already started, so {' '.join(missing)} cannot take effect: "
                      "call runtime.setup() before the first jax computation", stacklevel=3)
        return ()
    os.environ["XLA_FLAGS"] = " ".join([current, *missing]).strip()
    return missing


def setup(*, min_compile_seconds: float = 0.0) -> Optional[str]:
    """Turn on jax's persistent compilation cache for this process (see the module docstring); returns its dir.

    Every program that took at least `min_compile_seconds` to compile is cached (jax's own default, 1 s, would
    skip the many small programs whose compilation adds up). Also adds the cheaper-compilation CPU flags
    (`add_cpu_compile_flags`). Call it first thing in a binary's main(), before any jax computation.
    """
    add_cpu_compile_flags()
    path = compilation_cache_dir()
    if path is None:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot create the compilation cache directory {path} ({err}): set {ENV_VAR} to a "
                      f"writable directory, or to 0 to turn the cache off") from err
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def git_commit(path: Optional[str] = None) -> Optional[str]:
    """The short hash of HEAD of the git checkout holding `path` (default: this package's folder), or None when it
    is not in a checkout or git is unavailable. Uncommitted changes are not visible in it."""
    path = path or os.path.dirname(os.path.abspath(__file__))
    try:
        proc = subprocess.run(["git", "-C", path, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


def provenance(argv: Sequence[str], commit_path: Optional[str] = None) -> dict:
    """{"command": argv shell-quoted and joined, "commit": `git_commit(commit_path)`, "machine": platform, CPU
    count, Python, jax / jaxlib versions and the default backend's devices}. A binary passes `sys.argv`."""
    import jaxlib

    devices = jax.devices()
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__,
               "jaxlib": getattr(jaxlib, "__version__", None), "backend": jax.default_backend(),
               "devices": f"{len(devices)} x {devices[0].device_kind}"}
    return {"command": shlex.join(str(a) for a in argv), "commit": git_commit(commit_path), "machine": machine}
