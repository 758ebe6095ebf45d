"""`python -m hetbatch` is the `hetbatch` command."""

from hetbatch.cli import main

if __name__ == "__main__":
    main()
