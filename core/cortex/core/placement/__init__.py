"""The placement kernel the gateway, the operator and the simulator share (docs/architecture.md).

Layers, lowest first: `model` (views and actions), `eviction` (who gives way), `planner` (what
to load and unload), `snapshot` (neuron /status answers plus reservations into views). All pure.
"""
