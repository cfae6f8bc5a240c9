"""The seam between routing and whoever owns placement (docs/architecture.md).

Over a static fleet the gateway places models itself: `Placer` says where replicas are,
`OnDemand` loads a cold model and `Poller` polls the neurons. On Kubernetes the operator places
them: `KubeFleet` reads where replicas are from the watched ModelPlacements and Neurons, and
`DemandSignal` asks the operator for a cold model. Dispatch, /v1/models and /readyz see only these
protocols.
"""

from __future__ import annotations

from typing import Protocol

from cortex.gateway.catalogue import ModelAvailability


class Replicas(Protocol):
    """Where a model's replicas are: routing and /v1/models ask this."""

    def ready(self, model: str) -> list[str]:
        """Neurons to route `model` to now."""
        ...

    def availability(self, model: str) -> tuple[ModelAvailability, list[str]]:
        """loaded (somewhere ready) | loading | available, and the neurons holding it."""
        ...


class ColdStart(Protocol):
    """What a request for a model with no ready replica waits on."""

    async def ensure(self, model: str, timeout: float | None = None) -> str:
        """A neuron with a ready replica of `model`, within `timeout` seconds (the configured
        load timeout by default), else NeuronUnavailable with Retry-After."""
        ...


class FleetSource(Protocol):
    """What keeps the fleet's picture current in the background: polls or watches."""

    async def open(self) -> None:
        """Take the first picture (routing needs it), then keep it current until aclose()."""
        ...

    async def aclose(self) -> None: ...

    def routable(self) -> bool:
        """What /readyz says: whether this gateway can take requests now."""
        ...

    def current(self) -> bool:
        """Whether the fleet's picture is up to date (false: routing on the last one seen)."""
        ...
