"""The build step of fairseq-qplugin that pyproject.toml cannot declare: the optional C++ kernels
(fairseq_qplugin.pack._qkernels), built when torch is importable at build time (scripts/setup_env.sh
installs with --no-build-isolation). A failed compile only warns: the package then uses its
pure-torch kernels (pack/kernels.py) and logs a warning when they are first used. Metadata,
dependencies and extras: pyproject.toml."""
import logging
import platform
import sys

from setuptools import Distribution, setup

CSRC = "fairseq_qplugin/pack/csrc"


def kernel_extension():
    """([Extension], {"build_ext": cls}) for the C++ kernels, or ([], {}) when torch is not importable."""
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as e:  # noqa: BLE001 - any import failure means: no extension
        print(f"fairseq-qplugin: torch is not importable at build time ({e}); "
              "installing without the C++ kernels (pure-torch fallback)", file=sys.stderr)
        return [], {}

    class OptionalBuildExt(BuildExtension):
        """Builds the kernels if it can; a compile error leaves the pure-torch fallback in place."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001
                self._skip(e)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001
                self._skip(e)

        @staticmethod
        def _skip(e):
            logging.warning("fairseq-qplugin: building the C++ kernels failed (%s); the pure-torch "
                            "kernels will be used", e)
            print(f"WARNING: fairseq-qplugin C++ kernels not built: {e}", file=sys.stderr)

    # No -march=native: the AVX2 / AVX-512 code carries per-function target attributes and is chosen
    # at run time, so the same binary runs on any x86-64 CPU (and aarch64 builds the scalar path).
    flags = ["-O3", "-fopenmp"]
    ext = CppExtension(
        "fairseq_qplugin.pack._qkernels",
        [f"{CSRC}/ops.cpp", f"{CSRC}/scalar.cpp", f"{CSRC}/avx2.cpp", f"{CSRC}/avx512.cpp"],
        extra_compile_args=flags, extra_link_args=["-fopenmp"],
    )
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        ext.sources = ext.sources[:2]
    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=False)}


ext_modules, cmdclass = kernel_extension()


# ---- The torch-free runtime's engine (fairseq_qruntime/_engine.so) --------------------------------
def runtime_engine(cmdclass):
    """Build the runtime engine, a plain shared library (no Python or torch headers; fairseq_qruntime/
    build.py compiles csrc/engine.cpp with the kernels above), after build_py. Optional like the
    kernels: a failed build warns, unless QPLUGIN_REQUIRE_NATIVE=1 (CI), where it fails the install.
    Without it the runtime builds the library on first use (and the tests do)."""
    import glob
    import importlib.util
    import os

    from setuptools.command.build_py import build_py

    spec = importlib.util.spec_from_file_location("qruntime_build", os.path.join("fairseq_qruntime", "build.py"))
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)

    class BuildPyWithEngine(build_py):
        def run(self):
            super().run()
            root = "." if getattr(self, "editable_mode", False) else self.build_lib
            if not self.distribution.ext_modules and root != ".":  # no kernels: none left by an earlier build
                for stale in glob.glob(os.path.join(root, "fairseq_qplugin", "pack", "_qkernels*.so")):
                    os.unlink(stale)
            try:
                builder.build(os.path.join(root, "fairseq_qruntime", builder.LIBNAME))
            except Exception as e:  # noqa: BLE001
                if os.environ.get("QPLUGIN_REQUIRE_NATIVE") == "1":
                    raise
                print(f"WARNING: fairseq-qruntime engine not built ({e}); it is built on first use", file=sys.stderr)

    return {**cmdclass, "build_py": BuildPyWithEngine}


cmdclass = runtime_engine(cmdclass)


class EngineDistribution(Distribution):
    """A wheel that holds the engine is tied to the platform: ``py3-none-linux_x86_64`` (the engine
    uses no Python ABI, it is loaded with ctypes), or ``cp311-cp311-...`` with the torch kernels."""

    def has_ext_modules(self):
        return True


def platform_wheel(cmdclass):
    try:
        from setuptools.command.bdist_wheel import bdist_wheel  # setuptools >= 70.1
    except ImportError:
        from wheel.bdist_wheel import bdist_wheel

    class PlatformWheel(bdist_wheel):
        def get_tag(self):
            python, abi, plat = super().get_tag()
            return (python, abi, plat) if self.distribution.ext_modules else ("py3", "none", plat)

    return {**cmdclass, "bdist_wheel": PlatformWheel}


cmdclass = platform_wheel(cmdclass)

# Metadata, dependencies and extras are in pyproject.toml; setup.py only adds the compiled code.
setup(ext_modules=ext_modules, cmdclass=cmdclass, distclass=EngineDistribution)
