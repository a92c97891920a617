"""A worker process's entry point, ``python -m bnbench._worker`` (see bnbench.isolation). A
module of its own, which the package never imports, so that running it as ``__main__`` does not
import it twice."""

from bnbench.isolation import worker_main

if __name__ == "__main__":
    worker_main()
