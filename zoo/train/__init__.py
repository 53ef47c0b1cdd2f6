"""zoo.train: the training side of the zoo (what ``train_vision.py`` drives).

    from zoo.train import load_config, run
    cfg = load_config("configs/mnist5k_poolformer.yaml", ["train.epochs=2"])
    result = run(cfg, resume="auto")   # -> RunResult(summary, run_dir, top1, ...)

Modules: ``config`` (dataclasses, strict YAML loading), ``strict`` (the generic loader),
``optim`` (optimizer, the learning rate as a function of the step), ``checkpoint`` (atomic
checkpoints, resume, safetensors export), ``metrics`` (logs, plot), ``loop`` (the Accelerate loop).
"""

from .config import DEFAULT_CONFIG, TrainConfig, config_to_yaml, load_config
from .loop import RunResult, TrainingStopped, run
from .strict import ConfigError

__all__ = [
    "DEFAULT_CONFIG",
    "ConfigError",
    "RunResult",
    "TrainConfig",
    "TrainingStopped",
    "config_to_yaml",
    "load_config",
    "run",
]
