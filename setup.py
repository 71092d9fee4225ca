from setuptools import setup

setup()  # pyproject.toml holds the metadata; this shim serves tools that still call setup.py
