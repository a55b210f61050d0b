"""Frame sources: every frame of a recording exactly once, preprocessed per the bundle.

See `base.py` for the contract (`FrameSource`, `FrameBatch`) and `open_source` for selection.
"""

from capsule_batch.sources.base import (
    SOURCES,
    DecodeFailure,
    FrameBatch,
    FrameSource,
    RecordingInfo,
    open_source,
)

__all__ = ["SOURCES", "DecodeFailure", "FrameBatch", "FrameSource", "RecordingInfo", "open_source"]
