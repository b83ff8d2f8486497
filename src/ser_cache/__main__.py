"""`python -m ser_cache` (and so `torchrun -m ser_cache`) runs the same CLI as `ser-cache`."""

from ser_cache.cli.app import main

if __name__ == "__main__":
    main()
