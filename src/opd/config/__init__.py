"""OPD configuration: the typed ``opd:`` block (``schema``) and the trainer config ``opd_trainer.yaml``.

The block's defaults are written once, in :class:`OPDConfig`; importing this package registers them with
hydra as the ``opd_defaults`` config, which ``opd_trainer.yaml`` composes after verl's ``ppo_trainer``.
"""

from hydra.core.config_store import ConfigStore

from opd.config.schema import OVERLENGTH_POLICIES, OPDConfig, OPDConfigError

ConfigStore.instance().store(name="opd_defaults", node={"opd": OPDConfig.defaults()})

__all__ = ["OVERLENGTH_POLICIES", "OPDConfig", "OPDConfigError"]
