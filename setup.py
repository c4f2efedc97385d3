"""The package build's two generated parts: the gRPC stubs and the native scan kernels.

Everything else about the package is in pyproject.toml.

- gRPC stubs: `build_py` runs `facepq_proto.build` (grpcio-tools, a build requirement) before it
  collects the modules, so every standard install (`pip install .`, `pip install -e .`, a wheel
  or an sdist) has `facepq_proto.facepq.v1`; the stubs are never committed, and
  tests/query_node/test_proto_stubs.py checks that the ones in use match proto/.
- The extension module query_node._fastscan. It is optional: where it cannot be built (no C
  compiler, no Python headers) `pip install` still succeeds and facepq scans with its numba
  kernels (`query_node.fastscan.status()` says why).
"""
import importlib.util
import pathlib
import sys

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

ROOT = pathlib.Path(__file__).resolve().parent
# The generated packages do not exist in a fresh checkout when setuptools looks for packages.
STUB_PACKAGES = ["facepq_proto.facepq", "facepq_proto.facepq.v1"]


def generate_stubs() -> None:
    """Run facepq_proto/build.py from the source tree (importing the package would need it built)."""
    spec = importlib.util.spec_from_file_location("_facepq_proto_build", ROOT / "facepq_proto" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if module.build(force=False, quiet=True) != 0:
        raise SystemExit("generating the gRPC stubs from proto/ failed (see protoc's message above)")


class BuildPyWithStubs(build_py):
    """build_py that generates the gRPC stubs first (editable installs run build_py too).

    The stub packages are added to the build's package list here: in a fresh checkout they did not
    exist yet when setuptools discovered the packages.
    """

    def run(self):
        generate_stubs()
        for name in STUB_PACKAGES:
            if name not in self.packages:
                self.packages.append(name)
        super().run()


# Never -ffast-math, and no FMA contraction, so float sums round exactly like the numba
# kernels; no -mavx2: the AVX2 functions carry target attributes and are picked at import.
# -fno-wrapv undoes the -fwrapv of Python's own CFLAGS (which CPython's code relies on; this
# code does not): with it the 4-bit kernel measured ~5% slower.
FLAGS = [] if sys.platform == "win32" else ["-O3", "-std=gnu11", "-ffp-contract=off", "-fno-wrapv"]

setup(
    cmdclass={"build_py": BuildPyWithStubs},
    ext_modules=[
        Extension(
            "query_node._fastscan",
            sources=["query_node/_fastscan.c", "query_node/fastscan_kernels.c", "query_node/popcount_kernels.c"],
            depends=["query_node/fastscan_kernels.h", "query_node/popcount_kernels.h", "query_node/topk_heap.h"],
            extra_compile_args=FLAGS,
            optional=True,
        )
    ],
)
