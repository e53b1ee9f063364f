# setuptools needs the cffi_modules keyword through setup(); everything else is in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["c_ext/build.py:ffibuilder"])
