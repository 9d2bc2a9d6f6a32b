"""The design card's top-level setup.py. Every piece of metadata lives in pyproject.toml (and the version in
kernels/__init__.py, which pyproject.toml reads): this file only hands over to setuptools, which reads
them, so `pip install -e .` and `python setup.py --version` give the same answers. Add nothing here."""
from setuptools import setup

setup()
