"""The distributed gate under torchrun (env:// rendezvous, one machine or many)::

    torchrun --standalone --nproc-per-node 4 -m bnbench.torchrun --impl sync
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:PORT \\
        -m bnbench.torchrun --impl sync --device cuda

See bnbench.distributed.torchrun_main.
"""

import sys

from bnbench.distributed import torchrun_main

if __name__ == "__main__":
    sys.exit(torchrun_main())
