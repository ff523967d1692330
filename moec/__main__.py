"""`python -m moec`: the moec command line."""

from moec.cli.main import main

if __name__ == "__main__":
    main()
