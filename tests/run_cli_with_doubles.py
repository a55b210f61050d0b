"""`capsule-batch` with the test doubles registered: for subprocess and torchrun tests."""

import capsule_doubles  # noqa: F401  (registers test-av / test-torch)

from capsule_batch.cli import main

if __name__ == "__main__":
    main()
