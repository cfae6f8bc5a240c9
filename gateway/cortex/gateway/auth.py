"""API keys ([auth] of cortex.toml): who is calling, which models they may use, their token budget
and how many requests they may run at once (both enforced by gateway/ledger.py), whether they may
read the admin surface.

Keys are compared in constant time and never logged: logs name the key's owner instead.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cortex.core.catalogue import ModelSpec, unknown_model
from cortex.core.config import AuthSection, ConfigError
from cortex.core.errors import AdminKeyRequired, Forbidden, ModelNotFound, Unauthorized
from cortex.gateway.budget import Budget


@dataclass(eq=False)
class Principal:
    """The caller: a key's owner, or anonymous when auth is off."""

    name: str
    models: frozenset[str] = field(default_factory=frozenset)  # empty: every model
    budget: Budget | None = None
    admin: bool = False
    max_in_flight: int | None = None  # requests running at once; None: no limit


ANONYMOUS = Principal("anonymous", admin=True)  # auth off: every surface is open


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key from `x-api-key` (Anthropic clients) or `Authorization: Bearer` (OpenAI clients)."""
    key = headers.get("x-api-key")
    if key:
        return key.strip()
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


class Authenticator:
    """Maps presented keys to principals and enforces allowlists and budgets."""

    def __init__(self, section: AuthSection) -> None:
        self.enabled = False
        self._keys: list[tuple[bytes, Principal]] = []
        self.use(section)

    def use(self, section: AuthSection) -> None:
        """Take these keys (at start, and on a reload): the next request is judged by them."""
        keys: list[tuple[bytes, Principal]] = []
        for key in section.keys:
            budget = (
                Budget(key.budget_tokens, key.budget_window)
                if key.budget_tokens is not None
                else None
            )
            principal = Principal(
                key.name, frozenset(key.models), budget, key.admin, key.max_in_flight
            )
            secret = key.secret().encode()
            for other_secret, other in keys:
                if hmac.compare_digest(secret, other_secret):
                    raise ConfigError(f"auth keys {other.name!r} and {key.name!r} share a secret")
            keys.append((secret, principal))
        self.enabled, self._keys = section.enabled, keys

    def principals(self) -> list[Principal]:
        """The keys' owners, in the config's order."""
        return [principal for _, principal in self._keys]

    def authenticate(self, headers: Mapping[str, str]) -> Principal:
        if not self.enabled:
            return ANONYMOUS
        key = presented_key(headers)
        if key is None:
            raise Unauthorized(
                "missing API key: send `Authorization: Bearer <key>` or `x-api-key: <key>`"
            )
        presented = key.encode()
        found = None
        for secret, principal in self._keys:
            # Every key is compared, so timing does not reveal which prefix matched.
            if hmac.compare_digest(secret, presented):
                found = principal
        if found is None:
            raise Unauthorized("invalid API key")
        return found

    def authenticate_admin(self, headers: Mapping[str, str]) -> Principal:
        """The caller, if their key is of the admin class (401 without a key, 403 with another)."""
        principal = self.authenticate(headers)
        if not principal.admin:
            raise AdminKeyRequired(f"key {principal.name!r} is not an admin key")
        return principal

    def is_admin(self, headers: Mapping[str, str]) -> bool:
        """Whether the caller holds an admin key; never raises (for open routes with details)."""
        try:
            return self.authenticate(headers).admin
        except Unauthorized:
            return False

    @staticmethod
    def allows(principal: Principal, spec: ModelSpec) -> bool:
        """Whether the key's allowlist names the model (by id or one of its aliases)."""
        if not principal.models:
            return True
        return spec.id in principal.models or bool(principal.models.intersection(spec.aliases))

    @classmethod
    def authorize(cls, principal: Principal, spec: ModelSpec) -> None:
        """Forbidden unless the key's allowlist names the model."""
        if not cls.allows(principal, spec):
            raise Forbidden(f"key {principal.name!r} may not use model {spec.id!r}", param="model")


def unseen(principal: Principal, specs: Iterable[ModelSpec], name: str) -> ModelNotFound:
    """The 404 for a model name the key cannot see; its "did you mean" guesses only among the
    models the key may use, so it never names the others (docs/security.md)."""
    visible = [spec for spec in specs if Authenticator.allows(principal, spec)]
    return ModelNotFound(unknown_model(visible, name), param="model")
