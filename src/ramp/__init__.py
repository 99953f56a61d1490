"""ramp: reach services inside private networks without opening inbound ports."""

__version__ = "0.1.0"
