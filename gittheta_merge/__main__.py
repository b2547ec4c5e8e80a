"""Allow `python -m gittheta_merge …` (used when the console script is not on PATH)."""

from gittheta_merge.cli import main

if __name__ == "__main__":
    main()
