"""Build the optional compiled hot paths (README "The compiled hot path").

Each extension is ``optional``: on a machine without a C compiler or Python
headers ``pip install`` still succeeds and the pure-Python code runs instead
(``app.hotpath`` picks; ``HONGBAO_PURE_PYTHON=1`` forces the pure path).
Everything else about the package lives in pyproject.toml.
"""

from setuptools import Extension, setup

FLAGS = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"]

setup(ext_modules=[
    Extension("app.server._fastset", ["app/server/_fastset.c"], depends=["app/hotslots.h"],
              extra_compile_args=FLAGS, optional=True),
    Extension("app.client._fastclient", ["app/client/_fastclient.c"], depends=["app/hotslots.h"],
              extra_compile_args=FLAGS, optional=True),
])
