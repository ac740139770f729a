"""Allows ``python -m tfsft``."""

from tfsft.cli import main

if __name__ == "__main__":
    main()
