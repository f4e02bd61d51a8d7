"""Packaged defaults: the drafter shipped for the embedded default model."""

from pathlib import Path
from typing import Optional

DRAFTERS = Path(__file__).parent / "drafters"
DEFAULT_DRAFTER = DRAFTERS / "smollm2-135m-instruct"


def default_drafter_path() -> Optional[Path]:
    return DEFAULT_DRAFTER if (DEFAULT_DRAFTER / "config.json").exists() else None
