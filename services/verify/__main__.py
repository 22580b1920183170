"""Run verify: `python -m services.verify --config node.toml`."""

from services.common.runtime import main
from services.verify.service import DEFINITION, configure

if __name__ == "__main__":
    main(DEFINITION, configure=configure)
