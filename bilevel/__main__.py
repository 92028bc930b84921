"""``python -m bilevel ...``: the ``bilevel`` command, launchable by torchrun.

    torchrun --standalone --nproc_per_node=2 -m bilevel run problem=hyperclean-digits solver=soba

(torchrun runs ``python -m bilevel`` on every rank; :mod:`bilevel.distributed` explains what
the ranks share.)
"""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
