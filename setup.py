"""Package layout: the core `st_sdk/` and the built-in backend plugins in `backends/`, installed as
`st_sdk_backends` so they are discovered through the same entry points as any third-party backend.

The C backend's kernels (csrc/) are compiled by cffi here. The build is optional: without a working
C compiler the install still succeeds with a warning, and the C backend reports itself unavailable
with the reason."""
import sys

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

packages = find_packages(include=["st_sdk", "st_sdk.*"])
packages += ["st_sdk_backends"] + ["st_sdk_backends." + p for p in find_packages("backends")]


class OptionalBuildExt(build_ext):
    """A failed compile is a warning, never a failed install."""

    def run(self):
        try:
            super().run()
        except Exception as e:   # compiler missing, cffi source generation failed...
            print(f"WARNING: st-sdk C kernels not built ({type(e).__name__}: {e}); "
                  "the 'c' backend will report itself unavailable", file=sys.stderr)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:
            print(f"WARNING: st-sdk C extension {ext.name} failed to build ({type(e).__name__}: {e}); "
                  "the 'c' backend will report itself unavailable", file=sys.stderr)


setup(packages=packages, package_dir={"st_sdk_backends": "backends"},
      cffi_modules=["backends/c/build.py:ffibuilder"], cmdclass={"build_ext": OptionalBuildExt})
