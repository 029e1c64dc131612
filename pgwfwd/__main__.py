"""`python -m pgwfwd` runs the pgwfwd command."""

from pgwfwd.cli import main

if __name__ == "__main__":
    main(prog_name="pgwfwd")
