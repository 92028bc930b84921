"""One file per algorithm; importing this package registers them."""
from . import (  # noqa: F401
    accbo, adambo, aid_cg, bliss, amigo, borep, bsa, f2sa, itd_bio, lower_only, ma_soba, mrbo, saba, slip, soba, stocbio,
    sustain, ttsa, vrbo,
)
