"""Build script: the package layout plus the optional C++ extension ``staged._C``.

``kernels/`` installs as ``staged.kernels`` (a top-level ``kernels`` module would shadow the
PyPI package of that name, which transformers imports). The extension needs only a C++
compiler and the CPython headers; when it cannot be built the install still succeeds with a
warning, and ``staged.packing`` falls back to its pure-Python twin, which gives identical output.
"""
import glob
import os
import sys
import warnings

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Turn a failed C++ build into a warning: the pure-Python twin covers it."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler/toolchain failure
            warnings.warn(f"staged._C was not built ({exc}); using the pure-Python twin")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            warnings.warn(f"staged._C was not built ({exc}); using the pure-Python twin")


def extensions():
    if os.environ.get("STAGED_NO_EXT") == "1":
        return []
    flags = ["/O2", "/std:c++17"] if sys.platform == "win32" else ["-O3", "-std=c++17"]
    return [
        Extension(
            "staged._C",
            sources=sorted(glob.glob("csrc/*.cpp")),
            include_dirs=["csrc"],
            extra_compile_args=flags,
            language="c++",
        )
    ]


packages = find_packages(include=["staged", "staged.*"])
kernel_packages = ["staged.kernels"] + [
    "staged.kernels." + p for p in find_packages(where="kernels")
]
package_dir = {"staged.kernels": "kernels"}
package_dir.update({f"staged.kernels.{p}": f"kernels/{p.replace('.', '/')}" for p in find_packages(where="kernels")})

setup(
    packages=packages + kernel_packages,
    package_dir=package_dir,
    package_data={"staged": ["configs/*.toml", "configs/templates/*.jinja", "models/assets/*", "models/assets/**/*"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
)
