"""Build script of ffengine: the pure-Python package plus the optional compiled core ffengine._C.

setup.py drives CMake (the pybind11 `cmake_example` pattern). If the compiled core cannot be
built (no compiler, no CMake, no pybind11), the package still installs and runs on its
pure-torch backend; the build prints a warning saying why.

    pip install -e .                     # editable: ffengine/_C*.so lands in the source tree
    FFENGINE_SKIP_EXT=1 pip install .    # skip the compiled core on purpose
    CMAKE_ARGS="-DFOO=bar" pip install . # extra CMake configure arguments
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def read_version() -> str:
    """__version__ from ffengine/__init__.py, read as text (importing would need torch)."""
    text = (ROOT / "ffengine" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
    if match is None:
        raise RuntimeError("cannot find __version__ in ffengine/__init__.py")
    return match.group(1)


VERSION = read_version()


class CMakeExtension(Extension):
    """An extension built by CMake from `sourcedir` (which holds CMakeLists.txt)."""

    def __init__(self, name: str, sourcedir: str = "") -> None:
        # optional=True: if the build fails, setuptools does not try to copy a missing file
        # into the source tree for editable/in-place builds.
        super().__init__(name, sources=[], optional=True)
        self.sourcedir = os.fspath(Path(sourcedir).resolve())


class CMakeBuild(build_ext):
    """Configures and builds each CMakeExtension; a failure degrades to a warning."""

    def run(self) -> None:
        # setuptools clears self.inplace while building (it copies afterwards): remember it.
        self._to_source = bool(self.inplace or getattr(self, "editable_mode", False))
        super().run()

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            super().build_extension(ext)
            return
        if os.environ.get("FFENGINE_SKIP_EXT", "") not in ("", "0"):
            self._warn(ext, "FFENGINE_SKIP_EXT is set")
            return
        try:
            self._build_cmake(ext)
        except (OSError, ImportError, subprocess.CalledProcessError) as e:
            self._warn(ext, f"{type(e).__name__}: {e}")

    def _warn(self, ext: Extension, reason: str) -> None:
        # An in-place module from an earlier build would now be stale: remove it, so that the
        # package runs on (and says it runs on) the pure-torch backend.
        if getattr(self, "_to_source", False):
            package_dir = Path(self.get_finalized_command("build_py").get_package_dir("ffengine"))
            stale = package_dir / Path(self.get_ext_filename(ext.name)).name
            if stale.exists():
                stale.unlink()
                reason += f"; removed the stale {stale}"
        bar = "*" * 78
        print(
            f"\n{bar}\nWARNING: the compiled extension {ext.name} was not built ({reason}).\n"
            "ffengine installs without it and uses its pure-torch backend (slower).\n"
            "To build it, install a C++17 compiler and rerun `pip install -e .`.\n"
            f"{bar}\n",
            file=sys.stderr,
        )

    def _build_cmake(self, ext: CMakeExtension) -> None:
        import pybind11  # a build requirement (pyproject.toml); ImportError is caught above

        # With --inplace/editable, setuptools builds into build_lib first and then copies the
        # module next to ffengine/__init__.py (copy_extensions_to_source), so the editable
        # install finds ffengine/_C*.so in the source tree.
        ext_fullpath = Path.cwd() / self.get_ext_fullpath(ext.name)
        extdir = ext_fullpath.parent.resolve()
        debug = int(os.environ.get("DEBUG", 0)) if self.debug is None else self.debug
        cfg = "Debug" if debug else "Release"

        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}{os.sep}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY_{cfg.upper()}={extdir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DFFENGINE_VERSION={VERSION}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        ]
        if "CMAKE_ARGS" in os.environ:
            cmake_args += [item for item in os.environ["CMAKE_ARGS"].split(" ") if item]

        build_args = ["--config", cfg]
        if "CMAKE_BUILD_PARALLEL_LEVEL" not in os.environ and getattr(self, "parallel", None):
            build_args += [f"-j{self.parallel}"]

        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cmake", ext.sourcedir, *cmake_args], cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", *build_args], cwd=build_temp, check=True)


def packages() -> list[str]:
    """ffengine and its subpackages, plus the top-level kernels/ installed as ffengine.kernels."""
    found = find_packages(include=["ffengine", "ffengine.*"])
    if (ROOT / "kernels").is_dir():
        found.append("ffengine.kernels")
        found += [f"ffengine.kernels.{p}" for p in find_packages(where="kernels")]
    return found


setup(
    name="ffengine",
    version=VERSION,
    description=(
        "Backdoor forensics for vision foundation models: trace a backdoor to its poisoned "
        "pre-training inputs and their source domains"
    ),
    long_description=(ROOT / "README.md").read_text(encoding="utf-8")
    if (ROOT / "README.md").is_file()
    else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages(),
    package_dir={"ffengine.kernels": "kernels"},
    package_data={"ffengine": ["assets/**/*"]},
    ext_modules=[CMakeExtension("ffengine._C", sourcedir=str(ROOT))],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
    install_requires=[
        "torch",
        "torchvision",
        "numpy",
        "numba",
        "safetensors",
        "pillow",
        "tqdm",
        "matplotlib",
        "open_clip_torch",
        "scipy",  # the domain-level binomial test (ffengine.detect.domains)
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis"],
        "bench": ["pytest-benchmark", "dattri"],  # dattri: bench/peer_dattri.py only
    },
    entry_points={"console_scripts": ["ffengine=ffengine.cli:main"]},
)
