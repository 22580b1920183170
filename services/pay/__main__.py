"""Run pay: `python -m services.pay --config node.toml`."""

from services.common.runtime import main
from services.pay.service import DEFINITION, configure

if __name__ == "__main__":
    main(DEFINITION, configure=configure)
