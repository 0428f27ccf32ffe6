"""Provisioning: put the weights of a profile's roles on disk (DESIGN §2).

>>> from mongars_llm.provisioning import provision
>>> report = provision(["general"])          # doctest: +SKIP
>>> report.ok, [(e.role, e.action, e.path) for e in report]  # doctest: +SKIP

Providers (``huggingface``, ``local``, ``ollama``, plugins) implement the
:class:`Provider` template method; see docs/provisioning.md.
"""

from __future__ import annotations

from ._adapters import safe_extract, tree_sha256
from ._base import (
    ENTRY_POINT_GROUP,
    FetchResult,
    Provider,
    ProvisionRequest,
    Resolution,
    available_providers,
    get_provider,
    register_provider,
    unregister_provider,
)
from ._lockfile import LOCK_FILE_NAME, read_lock
from ._provision import aprovision, clear_cache, provision
from ._report import (
    AdapterRecord,
    PlannedFile,
    ProgressEvent,
    ProvisionEntry,
    ProvisionPlan,
    ProvisionReport,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "LOCK_FILE_NAME",
    "AdapterRecord",
    "FetchResult",
    "PlannedFile",
    "ProgressEvent",
    "Provider",
    "ProvisionEntry",
    "ProvisionPlan",
    "ProvisionReport",
    "ProvisionRequest",
    "Resolution",
    "aprovision",
    "available_providers",
    "clear_cache",
    "get_provider",
    "provision",
    "read_lock",
    "register_provider",
    "safe_extract",
    "tree_sha256",
    "unregister_provider",
]
