"""Run link: `python -m services.link --config node.toml`."""

from services.common.runtime import main
from services.link.service import DEFINITION

if __name__ == "__main__":
    main(DEFINITION)
