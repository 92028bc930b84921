"""Shared problem definitions; importing this package registers them."""
from . import auc, cosh, hpo, hpo_recurrent, hyperclean, hyperclean_digits, hyperrep, quadratic  # noqa: F401
