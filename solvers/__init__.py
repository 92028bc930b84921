"""One file per algorithm; importing this package registers them."""
from . import aid_cg, itd_bio, lower_only, soba, stocbio  # noqa: F401
