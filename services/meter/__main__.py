"""Run meter: `python -m services.meter --config node.toml`."""

from services.common.runtime import main
from services.meter.service import DEFINITION, configure

if __name__ == "__main__":
    main(DEFINITION, configure=configure)
