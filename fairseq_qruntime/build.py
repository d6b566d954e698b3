"""Build the engine as a plain shared library (no Python or torch headers): ``_engine.so``.

    python -m fairseq_qruntime.build [OUTPUT]

Sources: csrc/engine.cpp and the project's packed-weight kernels (fairseq_qplugin/pack/csrc:
scalar.cpp, avx2.cpp, avx512.cpp; the last two only on x86-64, where they are chosen at run time).
Compiler: $CXX or g++, flags -O3 -pthread -fopenmp-simd (the engine's threads are its own, not
OpenMP's: only OpenMP's `simd` loop hints are used, so no OpenMP runtime is linked). setup.py calls
``build`` at install; the loader (model.py) calls it on first use when no library is found, or when
the sources are there and differ from those it was built from: ``build`` writes their sha256 next to the library (``_engine.so.sources``; file times are no guide, since pip
gives every installed file the time it unpacked it). This module imports nothing outside the
standard library so that setup.py can load it by path.
"""
import glob
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
LIBNAME = "_engine.so"


def kernel_dir() -> str:
    return os.path.join(os.path.dirname(HERE), "fairseq_qplugin", "pack", "csrc")


def sources():
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    kernels = ["scalar.cpp"] + (["avx2.cpp", "avx512.cpp"] if x86 else [])
    return [os.path.join(HERE, "csrc", "engine.cpp")] + [os.path.join(kernel_dir(), k) for k in kernels]


def source_digest() -> str:
    """sha256 of the engine's sources and the kernels' headers, or "" when a source is absent (an install
    without them)."""
    h = hashlib.sha256()
    for src in sources() + sorted(glob.glob(os.path.join(kernel_dir(), "*.h"))):
        if not os.path.isfile(src):
            return ""
        with open(src, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def stamp_path(library: str) -> str:
    return library + ".sources"


def build(output: str = os.path.join(HERE, LIBNAME), verbose: bool = False) -> str:
    """Compile the library to ``output`` (written atomically); raises RuntimeError with the compiler's
    message if it fails."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or "c++"
    missing = [s for s in sources() if not os.path.isfile(s)]
    if missing:
        raise RuntimeError(f"engine sources missing: {missing}")
    digest = source_digest()  # of the sources as compiled (read before the compiler runs)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(os.path.abspath(output)))
    os.close(fd)
    base = [cxx, "-O3", "-std=c++17", "-fPIC", "-shared", f"-I{kernel_dir()}", *sources(), "-o", tmp]
    for flags in (["-pthread", "-fopenmp-simd"], ["-pthread"]):  # without the simd hints loops still vectorize
        proc = subprocess.run(base[:1] + flags + base[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode == 0:
            os.replace(tmp, output)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(output)))
            with os.fdopen(fd, "w") as f:
                f.write(digest + "\n")
            os.chmod(tmp, 0o644)
            os.replace(tmp, stamp_path(output))
            if verbose:
                print(f"built {output} with {cxx} {' '.join(flags)}", file=sys.stderr)
            return output
    os.unlink(tmp)
    raise RuntimeError(f"building the runtime engine failed ({cxx}):\n{proc.stdout[-3000:]}")


if __name__ == "__main__":
    build(*(sys.argv[1:2]), verbose=True)
