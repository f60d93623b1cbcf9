"""Exception types shared across packages, here so that the modules raising them and those
catching them need not import each other (decoding and the crash ledger both make ImageErrors)."""


class ImageError(Exception):
    """One image cannot be labelled; it becomes its images-table error row (``error_class``: the
    kind of failure, e.g. ``not_found``, ``decode_error``, ``worker_crash``, ``oom``)."""

    def __init__(self, error_class: str, message: str):
        super().__init__(message)
        self.error_class = error_class
