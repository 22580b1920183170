"""Run discovery: `python -m services.discovery --config node.toml`."""

from services.common.runtime import main
from services.discovery.service import DEFINITION

if __name__ == "__main__":
    main(DEFINITION)
