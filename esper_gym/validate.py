"""`python -m esper_gym.validate replays.json`: replay an evaluate run's episodes and check their
numbers (`esper_gym.bench.replay`; the file's schema: `esper_gym.bench.records`)."""

import sys

from esper_gym.bench.records import (
    FILE_NAME,
    FORMAT,
    MAX_FILE_BYTES,
    VERSION,
    ReplayError,
    load,
    write,
)
from esper_gym.bench.replay import check, main, replay, validate

__all__ = ["FILE_NAME", "FORMAT", "MAX_FILE_BYTES", "VERSION", "ReplayError", "check", "load"]
__all__ += ["main", "replay", "validate", "write"]

if __name__ == "__main__":
    sys.exit(main())
