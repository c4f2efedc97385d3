"""Python stubs generated from proto/facepq/v1/*.proto (see build.py).

The package build generates the stubs (setup.py runs `facepq_proto.build` in build_py, so a
plain `pip install .` or `pip install -e .` has them); they are never committed, and in a
source checkout `python -m facepq_proto.build` regenerates them whenever a .proto is newer
than its stub. The package is not
called `proto` because that name belongs to the PyPI package proto-plus.
"""
