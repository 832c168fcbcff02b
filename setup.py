# cffi in API (out-of-line) mode: the ioctl module is compiled at install time.
from setuptools import setup

setup(cffi_modules=["drivers/osio/_ioctl_build.py:ffibuilder"])
