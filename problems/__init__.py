"""Shared problem definitions; importing this package registers them."""
from . import hyperclean, quadratic  # noqa: F401
