"""Training: config and presets, the loop, checkpoints and resume, distributed setup.

``load_config(preset=..., overrides=[...])`` gives a validated :class:`TrainConfig`;
``vtok.train.loop.train(cfg)`` runs it (imported on demand, so reading a config stays light).
"""

from vtok.train.config import TrainConfig, from_dict, list_presets, load_config, save_config, to_dict

__all__ = ["TrainConfig", "from_dict", "list_presets", "load_config", "save_config", "to_dict"]
