# The C core in native/ is compiled by cffi at install time; everything else is in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["native/build.py:ffibuilder"])
