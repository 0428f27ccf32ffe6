"""Provisioning: put the weights of a profile's roles on disk (DESIGN §2).

>>> from mongars_llm.provisioning import provision
>>> report = provision(["general"])          # doctest: +SKIP
>>> report.ok, [(e.role, e.action, e.path) for e in report]  # doctest: +SKIP

Providers (``huggingface``, ``local``, ``ollama``, plugins) implement the
:class:`Provider` template method; see docs/provisioning.md.

Layering: this package sits above :mod:`mongars_llm.manager` (which says which
roles a profile has) and below the runtime, the server and the CLI.
:func:`provision` is the one way to provision, for a manager's profile
(``provision(roles, manager=manager)``) or for one it builds from
``profile``/``manifest``/``settings``. Modules: ``_provision`` (the orchestrator:
cache, single-flight, locks, lock file), ``_base`` (the provider interface and
registry), one module per provider, ``_gguf`` (GGUF -> transformers), ``_adapter_sources``,
``_installed`` (list and remove installs), ``_staging`` (staging folders and
leftovers of killed runs).
"""

from __future__ import annotations

from ._adapter_sources import safe_extract, tree_sha256
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
from ._gguf import convert_gguf
from ._installed import (
    InstalledModel,
    find_installed,
    installed_models,
    remove_installed,
    remove_models,
)
from ._local_copy import ProvisionedCopy, provisioned_copy
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
    "InstalledModel",
    "PlannedFile",
    "ProgressEvent",
    "Provider",
    "ProvisionEntry",
    "ProvisionPlan",
    "ProvisionReport",
    "ProvisionRequest",
    "ProvisionedCopy",
    "Resolution",
    "aprovision",
    "available_providers",
    "clear_cache",
    "convert_gguf",
    "find_installed",
    "get_provider",
    "installed_models",
    "provision",
    "provisioned_copy",
    "read_lock",
    "register_provider",
    "remove_installed",
    "remove_models",
    "safe_extract",
    "tree_sha256",
    "unregister_provider",
]
