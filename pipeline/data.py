"""`make data`: scrape, crop and pack with one config (each stage can also run alone)."""
import hydra
from omegaconf import DictConfig

from pipeline.crop import crop
from pipeline.errors import exit_on_error
from pipeline.pack import pack
from pipeline.scrape import scrape


@hydra.main(config_path="../conf", config_name="data", version_base="1.3")
@exit_on_error
def main(cfg: DictConfig) -> None:
    if not cfg.skip_scrape:
        scrape(cfg.scrape)
    if not cfg.skip_crop:
        crop(cfg.crop)
    pack(cfg.pack)


if __name__ == "__main__":
    main()
