r"""Cold against warm persistent compilation cache: one binary run twice in one script run.

    python -m experiments.bench_compile_cache                   # the study binary, SmolLM2, a small subsample
    python -m experiments.bench_compile_cache --binary=experiments.finetune \
        --args="--model=tiny-llama --data=backdoor --steps=2 --workdir={workdir}"

Runs `python -m <binary> <args>` in subprocesses, each with a fresh --workdir (so no stage is reused from disk):
  1. cache off (JAXINF_COMPILATION_CACHE=0),
  2. cold: an empty cache directory,
  3. warm: the same cache directory, now filled by run 2.
Reports each run's wall seconds, the XLA compilations jax logged (JAX_LOG_COMPILES=1: how many, and their summed
seconds, which include other threads' work on the same cores; a warm run logs as many, their seconds being cache
reads),
warm / cold and warm / off ratios, and the cache's size, as JSON. `--env NAME=VALUE` (repeatable) sets a variable
for all three runs and is part of the result's key, e.g. `--env JAXINF_XLA_FLAGS=0` for XLA's default compiler
settings instead of jaxinf.runtime's cheaper CPU flags.
Measured on a shared CPU: other jobs skew the seconds, so only the ratios within one run mean anything.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from jaxinf import recipes

FLAGS = flags.FLAGS
flags.DEFINE_string("binary", "experiments.attribute", "module run with python -m")
flags.DEFINE_string("args", "--limit_train=16 --limit_test=4 --epochs=1 --bootstrap=10 "
                    "--methods=grad_dot,exact,ekfac,repsim --workdir={workdir}",
                    "its arguments; {workdir} becomes a fresh directory per run")
flags.DEFINE_multi_string("env", [], "NAME=VALUE set in the environment of every run (repeatable)")
flags.DEFINE_string("out", "results/bench_compile_cache.json", "JSON results")


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _env_settings() -> dict:
    settings = {}
    for item in FLAGS.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise app.UsageError(f"--env={item!r}: expected NAME=VALUE")
        settings[name] = value
    return settings


def _run(args: list[str], cache: str, tmp: str, name: str) -> dict:
    workdir = os.path.join(tmp, f"workdir_{name}")
    cmd = [sys.executable, "-m", FLAGS.binary] + [a.replace("{workdir}", workdir) for a in args]
    env = dict(os.environ, **_env_settings(), JAXINF_COMPILATION_CACHE=cache, JAX_LOG_COMPILES="1")
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{name} run failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    compiles = [float(x) for x in re.findall(r"Finished XLA compilation of .+? in ([0-9.]+) sec", proc.stderr)]
    print(f"{name}: {seconds:.1f} s, {len(compiles)} XLA compilations logged taking {sum(compiles):.1f} s",
          flush=True)
    return {"seconds": seconds, "cache_bytes_after": _dir_bytes(cache) if os.path.isdir(cache) else 0,
            "xla_compilations": len(compiles), "xla_compile_seconds_logged": sum(compiles)}


def main(argv):
    del argv
    args = shlex.split(FLAGS.args)
    if not any("{workdir}" in a for a in args):
        raise app.UsageError("--args must contain {workdir} (each run needs a fresh one, or stages are reused)")
    load_start = list(os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "cache")
        runs = {"off": _run(args, "0", tmp, "off"),
                "cold": _run(args, cache, tmp, "cold"),
                "warm": _run(args, cache, tmp, "warm")}
    settings = _env_settings()
    prefix = " ".join(f"{k}={v}" for k, v in settings.items())
    result = {
        "command": f"{prefix + ' ' if prefix else ''}python -m {FLAGS.binary} {FLAGS.args}",
        "env": settings,
        "runs": runs,
        "warm_over_cold": runs["warm"]["seconds"] / runs["cold"]["seconds"],
        "warm_over_off": runs["warm"]["seconds"] / runs["off"]["seconds"],
        "cold_over_off": runs["cold"]["seconds"] / runs["off"]["seconds"],
        "cache_mib": runs["warm"]["cache_bytes_after"] / 2**20,
        "cpus": os.cpu_count(),
        "load_average_start_end": [load_start, list(os.getloadavg())],
    }
    existing = {}
    if os.path.exists(FLAGS.out):
        with open(FLAGS.out) as f:
            existing = json.load(f)
    existing[result["command"]] = result
    recipes.write_json(FLAGS.out, existing)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    app.run(main)
