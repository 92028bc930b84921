"""Shared problem definitions; importing this package registers them."""
from . import auc, cosh, data_selection, hpo, hpo_recurrent, hyperclean, hyperclean_digits, hyperrep, quadratic  # noqa: F401
