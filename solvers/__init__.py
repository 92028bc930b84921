"""One file per algorithm; importing this package registers them."""
from . import (  # noqa: F401
    accbo, adambo, aid_cg, amigo, borep, bsa, itd_bio, lower_only, ma_soba, mrbo, slip, soba, stocbio, sustain, ttsa,
    vrbo,
)
