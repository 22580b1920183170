"""Run sharp: `python -m services.sharp --config node.toml`."""

from services.common.runtime import main
from services.sharp.service import DEFINITION

if __name__ == "__main__":
    main(DEFINITION)
