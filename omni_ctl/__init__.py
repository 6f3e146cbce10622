"""Omni Proxy control plane: config rendering, process control, sidecars,
simulator and benchmarks around the nginx modules in nginx_modules/."""

__version__ = "0.1.0"
