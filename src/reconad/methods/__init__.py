"""Built-in methods; importing this package registers them."""

from .base import Method, MethodConfig, Prediction
from .gnl import GNL  # noqa: F401
from .rd4ad import RD4AD
from .rdpp import RDPP  # noqa: F401
from .recontrast import ReContrast  # noqa: F401
from .ssl_ae import SSLAE  # noqa: F401
from .ulsad import ULSAD  # noqa: F401

__all__ = ["Method", "MethodConfig", "Prediction", "RD4AD"]
