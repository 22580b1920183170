"""Run exit: `python -m services.exit --config node.toml`."""

from services.common.runtime import main
from services.exit.service import DEFINITION, configure

if __name__ == "__main__":
    main(DEFINITION, configure=configure)
