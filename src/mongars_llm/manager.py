"""``ModelManager``: the active profile of a manifest and its resolved roles.

>>> manager = ModelManager(profile="small")            # doctest: +SKIP
>>> manager.role("general").parameters["max_new_tokens"]  # doctest: +SKIP
256

Layering: this module sits on the manifest layer (``manifest/``, ``settings``)
and below provisioning. It says *which* models a profile uses and with which
parameters; :func:`mongars_llm.provision` (``provisioning/``) puts them on disk
and takes a manager (``provision(roles, manager=manager)``). The one upward
call, written as the single exception in docs/architecture.md and
tests/test_layering.py, is :meth:`~ModelManager.ensure_models_installed` (the
same call, DESIGN §2), which imports ``provisioning`` when called.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UnknownProfileError, UnknownRoleError
from .manifest import BUILTIN_SOURCE, Manifest, ResolvedRole, load_manifest, resolve_role
from .manifest.models import Profile
from .settings import PROFILE_ENV_VARS, Settings, get_settings, resolve_profile_name

if TYPE_CHECKING:
    from .provisioning import ProvisionReport

__all__ = ["ModelManager"]


class ModelManager:
    """The models of one manifest profile, resolved against the settings' bounds.

    ``manifest`` is a :class:`Manifest`, a path to a JSON/YAML file, or ``None``
    for the configured manifest (``settings.llm_models_path``, else the
    built-in one). The active profile is, by precedence: ``profile`` > a
    profile the settings set (``Settings(llm_models_profile=...)``, or the
    environment when they were read) > ``LLM_MODELS_PROFILE`` >
    ``MONGARS_LLM_MODELS_PROFILE`` > ``"default"`` (see
    :func:`~mongars_llm.settings.resolve_profile_name`); it is fixed when the
    manager is created. Provision its roles with
    ``mongars_llm.provision(roles, manager=manager)``.
    """

    def __init__(
        self,
        manifest: Manifest | str | Path | None = None,
        *,
        settings: Settings | None = None,
        profile: str | None = None,
    ) -> None:
        self.settings: Settings = settings if settings is not None else get_settings()
        if isinstance(manifest, Manifest):
            self.manifest: Manifest = manifest
        else:
            self.manifest = load_manifest(manifest, settings=self.settings)
        name = resolve_profile_name(profile, self.settings)
        #: why this profile is active, when the machine chose it (else ``None``)
        self.profile_reason: str | None = None
        if self.manifest.source is None and not _profile_chosen(profile, self.settings):
            from ._machine import machine_default_profile

            machine = machine_default_profile()
            if machine != name and machine in self.manifest.profiles:
                self.profile_reason = (
                    f"no CUDA here and no profile chosen: the built-in {machine!r} profile "
                    f"instead of {name!r} (an 8B model); choose with --profile or "
                    "LLM_MODELS_PROFILE"
                )
                name = machine
        if name not in self.manifest.profiles:
            available = list(self.manifest.profiles)
            close = difflib.get_close_matches(name, available, n=1)
            raise UnknownProfileError(name, available, hint=close[0] if close else None)
        self.profile_name: str = name

    def __repr__(self) -> str:
        return (
            f"ModelManager(manifest={self.manifest_source!r}, profile={self.profile_name!r}, "
            f"roles={self.role_names!r})"
        )

    @property
    def manifest_source(self) -> str:
        """The manifest file, or ``"<built-in>"``."""
        source = self.manifest.source
        return str(source) if source is not None else BUILTIN_SOURCE

    @property
    def profile(self) -> Profile:
        """The active profile."""
        return self.manifest.profiles[self.profile_name]

    @property
    def role_names(self) -> list[str]:
        """Roles of the active profile, in manifest order."""
        return list(self.profile.models)

    def role(self, name: str) -> ResolvedRole:
        """The resolved role ``name`` of the active profile."""
        if name not in self.profile.models:
            raise UnknownRoleError(name, self.role_names, profile=self.profile_name)
        return resolve_role(self.manifest, name, profile=self.profile_name, settings=self.settings)

    def roles(self, names: str | Iterable[str] | None = None) -> list[ResolvedRole]:
        """Resolved roles (all of the active profile by default).

        Every name is checked before any is resolved, so an unknown role fails
        the whole call; duplicates are kept once; a single string is one role.
        """
        if isinstance(names, str):
            names = [names]
        wanted = self.role_names if names is None else list(dict.fromkeys(names))
        for name in wanted:
            if name not in self.profile.models:
                raise UnknownRoleError(name, self.role_names, profile=self.profile_name)
        return [self.role(name) for name in wanted]

    def describe(self) -> dict[str, Any]:
        """The active profile with every role resolved, plus all profiles.

        The payload of ``GET /api/v1/models`` and ``mongars-llm models show --json``.
        """
        return {
            "manifest": self.manifest_source,
            "active_profile": self.profile_name,
            "profile": {
                "name": self.profile_name,
                "description": self.profile.description,
                "roles": {resolved.role: resolved.to_dict() for resolved in self.roles()},
            },
            "profiles": [
                {
                    "name": name,
                    "description": profile.description,
                    "roles": list(profile.models),
                }
                for name, profile in self.manifest.profiles.items()
            ],
        }

    # ------------------------------------------------------------ provisioning
    def ensure_models_installed(
        self, roles: str | Iterable[str] | None = None, *, force: bool = False, **kwargs: Any
    ) -> ProvisionReport:
        """``mongars_llm.provision(roles, manager=self, force=...)``: this profile's models on disk."""
        from .provisioning import provision

        return provision(roles, force=force, manager=self, **kwargs)


def _profile_chosen(explicit: str | None, settings: Settings) -> bool:
    """Whether the argument, the settings or an environment variable named a profile."""
    return bool(
        explicit
        or "llm_models_profile" in settings.model_fields_set
        or any(os.environ.get(name) for name in PROFILE_ENV_VARS)
    )
