"""Built-in methods; importing this package registers them."""

from .base import Method, MethodConfig, Prediction
from .rd4ad import RD4AD

__all__ = ["Method", "MethodConfig", "Prediction", "RD4AD"]
