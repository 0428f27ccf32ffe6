"""Which base model (and stacked adapter) a build trains on, settled before anything loads.

:func:`locate_base_model`: unset is the active profile's ``general`` role, a
``pkg://`` or ``.gguf`` file is provisioned (converted once) as the ``local``
provider does, a local folder becomes absolute, a role of the active profile is
provisioned as ``chat`` provisions it, anything else is a Hub id (read from the
copy ``provision`` installed, when there is one). :func:`stack_on` checks the
adapter ``base_adapter`` names and inherits its way of embedding.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BundleError, ConfigError
from ..provisioning import ProvisionedCopy
from ._config import DEFAULT_BASE_ROLE, BundleConfig, load_bundle_config
from ._stacking import BaseAdapter, resolve_base_adapter

if TYPE_CHECKING:
    from ..manager import ModelManager
    from ..provisioning import ProvisionEntry

__all__ = ["locate_base_model", "say", "stack_on"]

logger = logging.getLogger(__name__)


def locate_base_model(config: BundleConfig) -> tuple[BundleConfig, ProvisionedCopy | None, str]:
    """Settle ``base_model``; returns the config, the provisioned copy of a Hub model to
    load instead of the Hub, and the model as the user named it (for the run name).

    In order: unset is the active profile's ``general`` role (else its first), the model
    ``chat`` loads; a ``pkg://`` or ``.gguf`` file is provisioned (converted once) as the
    ``local`` provider does; a local folder becomes absolute (the wrapper and the adapter
    must load it from any folder); a role of the active profile is provisioned as
    ``chat`` provisions it; anything else is a Hub id, read from the copy ``provision``
    installed when there is one.
    """
    from ..provisioning.local import PACKAGE_SCHEME

    name = config.base_model
    if name is None:
        manager = _manager()
        roles = manager.role_names
        if not roles:
            raise ConfigError(
                f"no --base-model and profile {manager.profile_name!r} has no roles; pass "
                "--base-model (a Hub id, a checkpoint folder or a role)"
            )
        role = DEFAULT_BASE_ROLE if DEFAULT_BASE_ROLE in roles else roles[0]
        say(
            config,
            f"base model: role {role!r} of profile {manager.profile_name!r} "
            f"({manager.profile.models[role].name}); choose another with --base-model",
        )
        return _role_base(config, manager, role)
    local = Path(name).expanduser()
    if name.startswith(PACKAGE_SCHEME) or (local.is_file() and local.suffix.lower() == ".gguf"):
        return _provisioned_file(config, name)
    if local.exists():
        return config.model_copy(update={"base_model": str(local.resolve())}), None, name
    if "/" not in name and not name.startswith("."):
        manager = _manager()
        if name in manager.role_names:
            return _role_base(config, manager, name)
    from ..provisioning import provisioned_copy
    from ..settings import get_settings

    copy = provisioned_copy(
        name,
        revision=config.base_model_revision,
        settings=get_settings(),
        trust_remote_code=config.trust_remote_code,
    )
    if copy is not None:
        logger.info("base model %s: using the provisioned copy %s", name, copy.path)
    return config, copy, name


def _manager() -> ModelManager:
    from ..manager import ModelManager

    return ModelManager()


def _provision_one(config: BundleConfig, manager: ModelManager, role: str) -> ProvisionEntry:
    """Provision ``role`` as ``chat`` does; a failure is a ``BundleError`` saying how to fix it."""
    from ..provisioning import provision

    entry = manager.profile.models[role]
    say(config, f"provisioning {entry.name} ({entry.provider}) ...")
    report = provision([role], manager=manager, show_progress=config.progress)
    found = report[role]
    if not found.ok or not found.path:
        raise BundleError(
            f"base model {entry.name!r} (role {role!r} of profile {manager.profile_name!r}) "
            f"could not be provisioned: {found.error or found.verified or found.action}; run "
            f"`mongars-llm provision --roles {role}`, or pass --base-model a checkpoint folder"
        )
    return found


def _role_base(
    config: BundleConfig, manager: ModelManager, role: str
) -> tuple[BundleConfig, ProvisionedCopy | None, str]:
    """A manifest role as the base: provisioned first. A Hub model keeps its id (the
    adapter names it, loaded from the provisioned copy); any other is its local copy."""
    entry = manager.profile.models[role]
    found = _provision_one(config, manager, role)
    update: dict[str, Any] = {}
    if "trust_remote_code" not in config.model_fields_set:
        update["trust_remote_code"] = bool(entry.trust_remote_code)
    path = Path(str(found.path)).resolve()
    if found.provider == "huggingface" and found.revision:
        update["base_model"] = entry.name
        copy = ProvisionedCopy(repo_id=entry.name, revision=found.revision, path=path)
        return config.model_copy(update=update), copy, entry.name
    update["base_model"] = str(path)
    return config.model_copy(update=update), None, entry.name


def _provisioned_file(
    config: BundleConfig, name: str
) -> tuple[BundleConfig, ProvisionedCopy | None, str]:
    """A ``pkg://`` or ``.gguf`` file, provisioned (converted once) by the ``local``
    provider through a one-role manifest; the run trains on the converted folder."""
    from ..manager import ModelManager
    from ..manifest import parse_manifest

    manifest = parse_manifest(
        {"profiles": {"base": {"models": {"base": {"name": name, "provider": "local"}}}}},
        base_dir=Path.cwd(),
    )
    manager = ModelManager(manifest, profile="base")
    found = _provision_one(config, manager, "base")
    path = Path(str(found.path)).resolve()
    return config.model_copy(update={"base_model": str(path)}), None, name


def say(config: BundleConfig, text: str) -> None:
    """A status line on stderr when the run shows its progress (bar or lines)."""
    if config.progress or config.progress_every:
        print(text, file=sys.stderr, flush=True)


def stack_on(config: BundleConfig) -> tuple[BundleConfig, BaseAdapter | None]:
    """The adapter ``base_adapter`` names, checked; its pooling and attention mode become
    this run's unless the caller set them (the stack embeds one way)."""
    if config.base_adapter is None:
        return config, None
    adapter = resolve_base_adapter(config.base_adapter, registry_path=config.registry_path)
    inherited = {
        key: getattr(adapter.embedding, key)
        for key in ("pooling", "bidirectional")
        if adapter.embedding is not None and key not in config.model_fields_set
    }
    if inherited:
        config = load_bundle_config(config, **inherited)
    return config, adapter
