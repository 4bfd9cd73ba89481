"""meridio-proxy: the proxy of Meridio, written on trio."""

__version__ = "0.1.0.dev0"
