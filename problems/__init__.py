"""Shared problem definitions; importing this package registers them."""
from . import auc, cosh, hpo, hpo_recurrent, hyperclean, hyperclean_neural, hyperrep, quadratic  # noqa: F401
