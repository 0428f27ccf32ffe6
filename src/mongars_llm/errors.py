"""The whole exception tree of mongars-llm (standard library only).

Every error says what failed, the offending value, and how to fix it. Each
class also inherits from the builtin a caller would naturally catch, and says
in ``http_status`` how the HTTP server answers it (500 unless shown)::

    MongarsError
    ├── ConfigError (ValueError)             bad settings or arguments
    │   ├── ManifestError                     manifest file: path + JSON path
    │   ├── UnknownProfileError (LookupError) lists the available profiles
    │   └── UnknownRoleError (LookupError)    lists the known roles          404
    ├── MissingExtraError (ImportError)       names the `pip install` command
    ├── ProvisionError (RuntimeError)         a provider could not fetch/verify
    │   └── ProvisionLockTimeout (TimeoutError)
    ├── LLMRuntimeError (RuntimeError)        load/inference failure, stable `code`
    │   ├── ModelLoadError                    load_failed        503
    │   ├── InvalidInputError (ValueError)     invalid_input      400
    │   │   └── InputTooLongError              input_too_long     413
    │   ├── AdapterNotFoundError (LookupError) adapter_not_found  404
    │   ├── UnsupportedError                   unsupported        400
    │   ├── GenerationError                    generation_failed
    │   ├── EmbeddingError                     embedding_failed
    │   └── RuntimeClosedError                 closed
    ├── DatasetError (ValueError)             every bad line, with its number
    ├── RegistryError (RuntimeError)          adapter registry read/write
    └── BundleError (RuntimeError)            training bundle / wrapper export
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

__all__ = [
    "AdapterNotFoundError",
    "BundleError",
    "ConfigError",
    "DatasetError",
    "EmbeddingError",
    "GenerationError",
    "InputTooLongError",
    "InvalidInputError",
    "LLMRuntimeError",
    "ManifestError",
    "MissingExtraError",
    "ModelLoadError",
    "MongarsError",
    "ProvisionError",
    "ProvisionLockTimeout",
    "RegistryError",
    "RuntimeClosedError",
    "UnknownProfileError",
    "UnknownRoleError",
    "UnsupportedError",
]


class MongarsError(Exception):
    """Root of every error raised by mongars-llm."""

    #: the HTTP status the server answers this error with: 4xx when the request is
    #: at fault (never answered with the fallback reply), 5xx when the server is
    http_status: ClassVar[int] = 500


class ConfigError(MongarsError, ValueError):
    """Invalid settings, arguments or configuration files."""


class ManifestError(ConfigError):
    """A manifest that cannot be loaded.

    ``source`` is the file (or ``"<built-in>"``), ``json_path`` the dotted path
    of the offending value (``profiles.default.models.general.parameters.top_p``)
    and ``expected`` what would have been accepted.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        json_path: str = "",
        expected: str | None = None,
    ) -> None:
        self.source = source
        self.json_path = json_path
        self.expected = expected
        self.reason = message
        where = source or "<manifest>"
        if json_path:
            where = f"{where}: {json_path}"
        text = f"{where}: {message}"
        if expected:
            text += f" (expected {expected})"
        super().__init__(text)


class UnknownProfileError(ConfigError, LookupError):
    """A profile name that the manifest does not define."""

    def __init__(self, profile: str, available: Iterable[str], *, hint: str | None = None) -> None:
        self.profile = profile
        self.available = sorted(available)
        text = f"unknown profile {profile!r}; available profiles: {', '.join(self.available) or '(none)'}"
        if hint:
            text += f". Did you mean {hint!r}?"
        super().__init__(text)

    def __str__(self) -> str:  # LookupError would otherwise repr() the message
        return str(self.args[0])


class UnknownRoleError(ConfigError, LookupError):
    """A role name that the active profile does not define."""

    def __init__(self, role: str, known: Iterable[str], *, profile: str | None = None) -> None:
        self.role = role
        self.known = sorted(known)
        scope = f" in profile {profile!r}" if profile else ""
        super().__init__(
            f"unknown role {role!r}{scope}; known roles: {', '.join(self.known) or '(none)'}"
        )

    http_status = 404

    def __str__(self) -> str:
        return str(self.args[0])


class MissingExtraError(MongarsError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""

    def __init__(self, package: str, extra: str, *, feature: str | None = None) -> None:
        self.package = package
        self.extra = extra
        what = feature or "this feature"
        super().__init__(
            f'{what} needs the optional package {package!r}: pip install "mongars-llm[{extra}]"'
        )


class ProvisionError(MongarsError, RuntimeError):
    """A provider failed to resolve, fetch or verify a model."""


class ProvisionLockTimeout(ProvisionError, TimeoutError):
    """Another process held a role's provisioning lock for too long."""


class LLMRuntimeError(MongarsError, RuntimeError):
    """A runtime failure with a stable machine-readable ``code`` (see :attr:`CODES`)."""

    #: every ``code`` the runtime raises, with its meaning; docs/errors.md is generated
    #: from it and a test checks that each code used in the source is listed here.
    CODES: ClassVar[dict[str, str]] = {
        "load_failed": "the model, its tokenizer or an adapter could not be loaded "
        "(missing files, no access to the Hub, impossible quantisation)",
        "invalid_input": "an argument is wrong: empty input, unknown pooling, bad sampling "
        "value, unknown adapter use",
        "input_too_long": "the input has more tokens than `settings.model.max_input_tokens` "
        "(MONGARS_MODEL__MAX_INPUT_TOKENS) or the model's context",
        "adapter_not_found": "the adapter named in the call is not loaded",
        "unsupported": "the model cannot do what was asked (e.g. bidirectional attention "
        "without sdpa/eager attention)",
        "generation_failed": "the forward pass failed while generating",
        "embedding_failed": "the forward pass failed while embedding",
        "closed": "the runtime was closed (`close()`); build or fetch a new one",
        "runtime_error": "any other runtime failure (the default code)",
    }

    #: the code a subclass raises when none is given
    default_code: ClassVar[str] = "runtime_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        self.code = code if code is not None else self.default_code
        super().__init__(message)

    @classmethod
    def for_code(cls, code: str) -> type[LLMRuntimeError]:
        """The class (``cls`` or a subclass) whose :attr:`default_code` is ``code``;
        ``cls`` itself when none is (an error of the LLM2Vec core, which carries only
        a code, becomes its class this way)."""
        pending: list[type[LLMRuntimeError]] = [cls]
        while pending:
            kind = pending.pop()
            if kind.default_code == code:
                return kind
            pending.extend(kind.__subclasses__())
        return cls

    @classmethod
    def wrap(cls, err: BaseException, what: str) -> LLMRuntimeError:
        """``err`` itself when it is already an :class:`LLMRuntimeError`, else a ``cls``
        saying ``what`` failed, caused by ``err`` (an error from torch or transformers)."""
        if isinstance(err, LLMRuntimeError):
            return err
        error = cls(f"{what}: {err}")
        error.__cause__ = err
        return error


class ModelLoadError(LLMRuntimeError):
    """The model, its tokenizer or an adapter could not be loaded."""

    default_code = "load_failed"
    http_status = 503


class InvalidInputError(LLMRuntimeError, ValueError):
    """An argument of a runtime call is wrong (the message names it and the fix);
    ``param`` is the argument's name when there is one."""

    default_code = "invalid_input"
    http_status = 400

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None) -> None:
        self.param = param
        super().__init__(message, code=code)


class InputTooLongError(InvalidInputError):
    """The input has more tokens than the runtime's limit."""

    default_code = "input_too_long"
    http_status = 413


class AdapterNotFoundError(LLMRuntimeError, LookupError):
    """A call named an adapter that is not loaded."""

    default_code = "adapter_not_found"
    http_status = 404

    def __str__(self) -> str:  # LookupError would otherwise repr() the message
        return str(self.args[0])


class UnsupportedError(LLMRuntimeError):
    """The model cannot do what was asked."""

    default_code = "unsupported"
    http_status = 400


class GenerationError(LLMRuntimeError):
    """The forward pass failed while generating."""

    default_code = "generation_failed"


class EmbeddingError(LLMRuntimeError):
    """The forward pass failed while embedding."""

    default_code = "embedding_failed"


class RuntimeClosedError(LLMRuntimeError):
    """The runtime was closed."""

    default_code = "closed"


class DatasetError(MongarsError, ValueError):
    """A dataset with invalid records; ``problems`` lists every one of them."""

    def __init__(self, message: str, problems: Sequence[Any] = ()) -> None:
        self.problems = list(problems)
        super().__init__(message)


class RegistryError(MongarsError, RuntimeError):
    """The adapter registry could not be read or updated."""


class BundleError(MongarsError, RuntimeError):
    """A training bundle or wrapper export failed."""
