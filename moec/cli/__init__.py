"""Command-line interface (click): thin commands that call moec.api."""
