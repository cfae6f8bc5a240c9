"""The Kubernetes operator: reconciles Neuron and ModelPlacement objects with kopf (docs/kubernetes.md)."""
