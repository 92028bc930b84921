"""Shared problem definitions; importing this package registers them."""
from . import cosh, hpo, hyperclean, hyperrep, quadratic  # noqa: F401
