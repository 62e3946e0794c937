"""``python -m conceptlm`` entry point."""

from conceptlm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
