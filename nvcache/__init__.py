"""nvcache: a node-wide cache of container-image layer scan records.

The one place that picks the hot index: the compiled ``nvcache._index``
(built from ``ext/_index.pyx``) unless it is missing or
``NVCACHE_NO_EXTENSIONS`` is set to a non-empty value other than ``0``, else
its pure-Python twin ``nvcache.fallback``. ``EXTENSION`` says which is in use.
"""

import logging
import os
from types import ModuleType

from . import fallback
from .cache import DEFAULT_PATH, LayerCache
from .errors import CacheDamaged, CacheError, CacheFull, CacheTimeout, RecordTooLarge
from .policy import DEFAULT_POLICY, POLICIES as _POLICY_CLASSES

POLICIES = tuple(_POLICY_CLASSES)  # the eviction policies' names, for LayerCache(policy=...)

_core: ModuleType = fallback
EXTENSION = False
if os.environ.get("NVCACHE_NO_EXTENSIONS", "") in ("", "0"):
    try:
        from . import _index as _compiled
    except ImportError as exc:  # not built (no compiler, no LMDB headers) or its library is missing
        logging.getLogger("nvcache").warning(
            "nvcache's compiled core cannot be loaded (%s); using the pure-Python core, which is "
            "slower but the same cache (set NVCACHE_NO_EXTENSIONS=1 to choose it without this warning)", exc)
    else:
        _core = _compiled
        EXTENSION = True

LayerCache._core = _core

__version__ = "0.1.0"
__all__ = ["LayerCache", "CacheError", "CacheDamaged", "CacheFull", "CacheTimeout", "RecordTooLarge",
           "EXTENSION", "DEFAULT_PATH", "POLICIES", "DEFAULT_POLICY", "__version__"]
