"""Optional baselines of `selfspec bench`, installed by `make extras`.

    python -m selfspec.bench.extras llama-cpp   # build llama-cpp-python once per machine, install it

PyPI has no llama-cpp-python wheel for this platform, so pip compiles llama.cpp (15-45 minutes
on 2 cores). The build is a wheel kept in the cache folder under a key of this machine's
instruction set (`llama-cpp/<version>-<isa>-<flags hash>/`) and compiled for that instruction set
(`GGML_NATIVE`): a second install on the same machine (a fresh clone, a new venv) reuses it in
seconds, and a machine with another instruction set builds its own. `build.json` beside the wheel
says what it was built for; the bench reports it (`methods[].engine` in results.json).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LLAMA_CPP_VERSION = "0.3.36"


def build_key() -> str:
    from selfspec.hardware import cpu_info, isa

    info = cpu_info()
    digest = hashlib.sha256((info["cpu"] + ";" + ",".join(info["flags"])).encode()).hexdigest()[:8]
    return f"{LLAMA_CPP_VERSION}-{isa()}-{digest}"


def build_dir() -> Path:
    from selfspec.paths import cache_dir

    return cache_dir() / "llama-cpp" / build_key()


def build_info() -> dict | None:
    """build.json of this machine's cached llama.cpp build, if there is one."""
    try:
        return json.loads((build_dir() / "build.json").read_text())
    except (OSError, ValueError):
        return None


def _say(msg: str) -> None:
    print(f"llama.cpp: {msg}", file=sys.stderr, flush=True)


def _progress(log: Path) -> str:
    """The compiler's latest `[ 42%]` step in the build log (pip -v passes CMake's output on)."""
    import re

    try:
        tail = log.read_bytes()[-20000:].decode("utf-8", "replace")
    except OSError:
        return ""
    steps = re.findall(r"\[\s*(\d+)%\]", tail)
    return f", {steps[-1]}% of llama.cpp compiled" if steps else ""


def build_wheel() -> Path:
    """The cached wheel for this machine, built first if there is none (progress on stderr)."""
    from selfspec.hardware import cpu_info, isa

    out = build_dir()
    wheels = sorted(out.glob("llama_cpp_python-*.whl"))
    if wheels:
        _say(f"reusing the build for {build_key()} ({wheels[-1]})")
        return wheels[-1]
    out.mkdir(parents=True, exist_ok=True)
    log = out / "build.log"
    jobs = str(os.cpu_count() or 1)
    env = {**os.environ, "CMAKE_ARGS": os.environ.get("CMAKE_ARGS", "-DGGML_NATIVE=ON"),
           "CMAKE_BUILD_PARALLEL_LEVEL": os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", jobs)}
    _say(f"building llama-cpp-python {LLAMA_CPP_VERSION} for {isa()} ({', '.join(cpu_info()['flags'])}) "
         f"with {jobs} jobs, once for this machine (15-45 minutes on 2 cores); log: {log}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-binary=llama-cpp-python",
                                 f"llama-cpp-python=={LLAMA_CPP_VERSION}", "-w", tmp], stdout=err,
                                stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _say(f"still building, {time.perf_counter() - t0:.0f} s{_progress(log)}")
        if proc.returncode != 0:
            raise SystemExit(f"llama.cpp: the build failed (status {proc.returncode}); see {log}")
        built = next(Path(tmp).glob("llama_cpp_python-*.whl"))
        wheel = out / built.name
        shutil.move(str(built), wheel)
    seconds = time.perf_counter() - t0
    (out / "build.json").write_text(json.dumps(
        {"version": LLAMA_CPP_VERSION, "key": build_key(), "isa": isa(), **cpu_info(), "cmake_args": env["CMAKE_ARGS"],
         "build_seconds": round(seconds), "wheel": wheel.name}, indent=1))
    _say(f"built in {seconds:.0f} s: {wheel}")
    return wheel


def install_llama_cpp() -> None:
    wheel = build_wheel()
    subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", str(wheel)],
                   check=True)
    _say(f"installed {wheel.name} (built for {build_key()})")


def main(argv: list[str]) -> None:
    if argv != ["llama-cpp"]:
        raise SystemExit("usage: python -m selfspec.bench.extras llama-cpp")
    install_llama_cpp()


if __name__ == "__main__":
    main(sys.argv[1:])
