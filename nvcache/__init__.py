"""nvcache: a node-wide cache of container-image layer scan records.

The one place that picks the hot index: the compiled ``nvcache._index``
(built from ``ext/_index.pyx``) unless it is missing or
``NVCACHE_NO_EXTENSIONS`` is set to a non-empty value other than ``0``, else
its pure-Python twin ``nvcache.fallback``. ``EXTENSION`` says which is in use.
"""

import os
from types import ModuleType

from . import fallback
from .cache import DEFAULT_PATH, LayerCache
from .errors import CacheError, CacheFull, CacheTimeout, RecordTooLarge

_core: ModuleType = fallback
EXTENSION = False
if os.environ.get("NVCACHE_NO_EXTENSIONS", "") in ("", "0"):
    try:
        from . import _index as _compiled
    except ImportError:  # not built (e.g. a source tree without a compiler)
        pass
    else:
        _core = _compiled
        EXTENSION = True

LayerCache._core = _core

__version__ = "0.1.0"
__all__ = ["LayerCache", "CacheError", "CacheFull", "CacheTimeout", "RecordTooLarge",
           "EXTENSION", "DEFAULT_PATH", "__version__"]
