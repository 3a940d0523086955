"""The exceptions nvcache raises.

Every failure of the cache itself is a :class:`CacheError`; a scanner that
catches ``CacheError`` and treats it as a miss can never be taken down by
its cache. Bad arguments are the caller's bug and raise the usual
``TypeError`` / ``ValueError`` instead (``RecordTooLarge`` is both).
"""


class CacheError(Exception):
    """The cache could not do what was asked (closed, damaged, no space...)."""


class RecordTooLarge(CacheError, ValueError):
    """A record is larger than the cache's whole bound; nothing was changed."""


class CacheFull(CacheError):
    """No room could be made without evicting kept records; nothing was changed."""


class CacheTimeout(CacheError):
    """A lock could not be taken within ``lock_timeout`` seconds."""


class CacheDamaged(CacheError):
    """The cache, or a record in it, is damaged or not this version's, and this handle does not
    repair (``LayerCache(..., repair=False)``): nothing was changed. The message says what is
    wrong; a ``repair=True`` cache (the default, or ``nvcache repair``) rebuilds or drops it."""


class StaleReader(CacheError):
    """Internal: a read met a reader whose environment another thread had just replaced."""
