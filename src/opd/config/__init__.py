"""OPD configuration: the typed ``opd:`` block (``schema``) and the trainer config ``opd_trainer.yaml``."""

from opd.config.schema import OVERLENGTH_POLICIES, OPDConfig, OPDConfigError

__all__ = ["OVERLENGTH_POLICIES", "OPDConfig", "OPDConfigError"]
