"""The ``raysky`` command line (:mod:`raysky.cli.main`): one module per sub-command, each
mapping its flags to the Python API's settings and parameters. Modules import only light
names at the top, so ``raysky --help`` loads neither torch, Ray, pandas nor jinja2."""

__all__: list[str] = []
