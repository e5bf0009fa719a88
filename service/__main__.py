"""`python -m service` runs the convserve CLI."""

from service.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
