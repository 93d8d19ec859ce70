"""cnexp entry point: `python run.py [+ablation=NAME] [key=value ...]` (see conf/train.yaml).

What a job does and how it records its end (status.json, error.txt, exit codes): cnexp/run/job.py.
"""
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from cnexp.config import register_configs
from cnexp.run.job import run_job
from cnexp.schema import check_command_line

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    run_job(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    check_command_line(sys.argv[1:])  # an unknown key: its nearest knob, before Hydra's "use +"
    main()
