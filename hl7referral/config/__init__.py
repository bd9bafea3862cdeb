"""Configuration as data: ``engine.toml`` and ``channels/*.toml``.

Every file is validated when loaded; errors name file, line and key.
"""

from .engine import EngineConfig, ListenerConfig, load_engine
from .channels import ChannelConfig, load_channels
from .schema import ConfigError

__all__ = ["ChannelConfig", "ConfigError", "EngineConfig", "ListenerConfig", "load_channels", "load_engine"]
