"""Python stubs generated from proto/facepq/v1/*.proto (see build.py).

The stubs are generated at install time and never committed; `facepq_proto.build`
regenerates them whenever a .proto is newer than its stub. The package is not
called `proto` because that name belongs to the PyPI package proto-plus.
"""
