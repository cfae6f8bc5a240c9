"""The `cortex` command (docs/architecture.md, "Packages"): it starts every process, so it alone
may import every component; each command imports its component's heavy libraries itself."""
