"""One request from authorisation to its last byte (proxy.py), and what it drives: dispatch to a
replica, the neuron's stream, the accounting of its end."""
