"""Package layout: the core `st_sdk/` and the built-in backend plugins in `backends/`, installed as
`st_sdk_backends` so they are discovered through the same entry points as any third-party backend."""
from setuptools import find_packages, setup

packages = find_packages(include=["st_sdk", "st_sdk.*"])
packages += ["st_sdk_backends"] + ["st_sdk_backends." + p for p in find_packages("backends")]

setup(packages=packages, package_dir={"st_sdk_backends": "backends"})
