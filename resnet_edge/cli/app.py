"""The Typer application and its global options; the commands are added by the modules beside this one."""

from __future__ import annotations

import logging

import typer

from resnet_edge import __version__
from resnet_edge.cli.console import console

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train a ResNet on MNIST, export it to ONNX and INT8, benchmark and serve it.",
)


def _version(value: bool) -> None:
    if value:
        console.print(f"resnet-edge {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what the library does."),
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
