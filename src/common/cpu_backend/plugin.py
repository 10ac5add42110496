"""Importing this module activates the CPU backend; list it in ``VERL_USE_EXTERNAL_MODULES``.

``import verl`` imports each module named there (comma-separated) in every process, before any
platform lookup, which is exactly when the ``cpu`` platform must be registered.
"""

from . import activate

activate()
