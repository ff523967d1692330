"""moec: a Mixture-of-Experts compiler with a bit-width per expert, for edge devices."""

__version__ = "0.1.0"
