"""Shared problem definitions; importing this package registers them."""
from . import cosh, hpo, hyperclean, quadratic  # noqa: F401
