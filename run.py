"""cnexp entry point: `python run.py [+ablation=NAME] [key=value ...]` (see conf/train.yaml)."""
import logging
import sys

import hydra
from omegaconf import DictConfig

from cnexp.config import register_configs
from cnexp.errors import CnexpError

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from cnexp.train import train  # heavy imports after Hydra has parsed the command line

    try:
        train(cfg)
    except CnexpError as err:  # a user-fixable problem: the message, not a traceback
        logging.getLogger("cnexp").error("%s", err)
        sys.exit(2)


if __name__ == "__main__":
    main()
