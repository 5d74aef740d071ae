"""dermris core: what every layer shares, without torch.

* :mod:`.errors` — the one exception hierarchy (:class:`DermrisError` and its refinements);
* :mod:`.atomic` — durable, atomic file writes;
* :mod:`.imageio` — safe image reading and decoding (PIL);
* :mod:`.hashing` — file content hashes;
* :mod:`.style_layout` — where each block stage lives in a style vector;
* :mod:`._lazy` — lazy re-exports for package ``__init__`` modules.

Nothing here imports torch, so the store, the retriever's row queries and the command line's
store commands start quickly.
"""

from __future__ import annotations

from .atomic import (
    append_durably,
    atomic_path,
    atomic_write,
    atomic_write_bytes,
    fsync_dir,
    fsync_file,
)
from .errors import *  # noqa: F403 - the hierarchy is the public surface
from .errors import __all__ as _errors
from .hashing import file_sha256
from .imageio import (
    IMAGE_FORMATS,
    MAX_FILE_BYTES,
    decode_image,
    decode_image_bytes,
    read_file_bytes,
    to_pixels,
    to_rgb,
)
from .style_layout import StyleLayout

__all__ = sorted(
    [
        *_errors,
        "IMAGE_FORMATS",
        "MAX_FILE_BYTES",
        "StyleLayout",
        "append_durably",
        "atomic_path",
        "atomic_write",
        "atomic_write_bytes",
        "decode_image",
        "decode_image_bytes",
        "file_sha256",
        "fsync_dir",
        "fsync_file",
        "read_file_bytes",
        "to_pixels",
        "to_rgb",
    ]
)
