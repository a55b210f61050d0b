"""`python -m capsule_batch` is the same as the `capsule-batch` console script."""

from capsule_batch.cli import main

if __name__ == "__main__":
    main()
