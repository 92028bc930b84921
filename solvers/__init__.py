"""One file per algorithm; importing this package registers them."""
from . import accbo, aid_cg, amigo, bsa, itd_bio, lower_only, ma_soba, soba, stocbio, ttsa  # noqa: F401
