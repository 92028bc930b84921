"""Shared problem definitions; importing this package registers them."""
from . import cosh, hyperclean, quadratic  # noqa: F401
