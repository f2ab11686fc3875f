"""placeholder"""
import click


@click.command()
def bench_speculative() -> None:
    """(in progress)"""
