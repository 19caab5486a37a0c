"""`make data`: scrape, crop and pack with one config (each stage can also run alone)."""
import hydra
from omegaconf import DictConfig

from dataclasses import dataclass

from pipeline.config import Paths, checked, key
from pipeline.crop import CropConfig, crop
from pipeline.errors import exit_on_error
from pipeline.pack import PackConfig, pack
from pipeline.scrape import ScrapeConfig, scrape


@dataclass
class DataJob:
    """conf/data.yaml: the three data stages' groups and what to skip."""
    paths: Paths = key(default=Paths)
    scrape: ScrapeConfig = key(default=ScrapeConfig)
    crop: CropConfig = key(default=CropConfig)
    pack: PackConfig = key(default=PackConfig)
    skip_scrape: bool = key()
    skip_crop: bool = key()


@hydra.main(config_path="../conf", config_name="data", version_base="1.3")
@exit_on_error
def main(cfg: DictConfig) -> None:
    cfg = checked(cfg, DataJob)
    if not cfg.skip_scrape:
        scrape(cfg.scrape)
    if not cfg.skip_crop:
        crop(cfg.crop)
    pack(cfg.pack)


if __name__ == "__main__":
    main()
