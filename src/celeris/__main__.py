"""`python -m celeris` = the `celeris` command."""

from celeris.cli import main

if __name__ == "__main__":
    main()
