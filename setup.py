# setuptools needs the cffi_modules keyword through setup(); everything else is in
# pyproject.toml. The core's module, then one per device that has C: a device folder
# with a build.py (devices/NAME/build.py:ffibuilder) is picked up without editing this.
from pathlib import Path

from setuptools import setup

DEVICE_BUILDS = sorted(str(p) for p in Path("devices").glob("*/build.py"))

setup(cffi_modules=["c_ext/build.py:ffibuilder", *(f"{b}:ffibuilder" for b in DEVICE_BUILDS)])
