"""Run route: `python -m services.route --config node.toml`."""

from services.common.runtime import main
from services.route.service import DEFINITION

if __name__ == "__main__":
    main(DEFINITION)
