"""The Typer app, the shared options and the error guard of every command."""

from __future__ import annotations

import functools
from pathlib import Path

import typer
from rich.console import Console

from ..errors import OutlierlabError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Find, explain and remove the activation outliers of Hugging Face causal LMs.")
err = Console(stderr=True, soft_wrap=True)


@app.callback()
def _quiet_libraries() -> None:
    """Keep the terminal to outlierlab's own progress and messages."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
out = Console()

ModelOpt = typer.Option("smollm2-135m", "--model", "-m",
                        help="alias (smollm2-135m), .gguf file, local HF folder or hub id")
DataOpt = typer.Option("brown:calib", "--data", "-d",
                       help="brown:calib | brown:eval | a text file | hf:NAME[:CONFIG[:SPLIT]]")
OutOpt = typer.Option(Path("out"), "--out", "-o", help="output folder")
SeqOpt = typer.Option(512, "--seq-len", help="tokens per window")
NOpt = typer.Option(16, "--n-samples", "-n", help="number of windows")
SeedOpt = typer.Option(0, "--seed", help="seed of the window choice and of the statistics' sampling")
BosOpt = typer.Option("auto", "--bos", help="start each window with BOS: auto (as the tokenizer does) | always | never")
DeviceOpt = typer.Option("cpu", "--device", help="cpu | cuda | auto")
DtypeOpt = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16")
BatchOpt = typer.Option(4, "--batch-size", "-b", help="windows per forward pass")
DebugOpt = typer.Option(False, "--debug", help="show tracebacks")
MaxMemoryOpt = typer.Option(None, "--max-memory",
                            help="place the model with accelerate within this budget, e.g. 0=20GiB,cpu=60GiB: "
                                 "what does not fit is offloaded to the CPU or disk and run layer by layer")
ProgressOpt = typer.Option(True, "--progress/--no-progress", help="progress bars")


def split_list(text: str) -> list[str]:
    """A comma-separated option value as its non-empty, stripped items."""
    return [item.strip() for item in text.split(",") if item.strip()]


def guarded(fn):
    """Run a command turning known failures into one clear line and a non-zero exit status."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = kwargs.get("debug", False)
        try:
            return fn(*args, **kwargs)
        except OutlierlabError as exc:
            if debug:
                raise
            err.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            err.print("[bold red]interrupted[/]: nothing half-written was left behind")
            raise typer.Exit(130)
        except OSError as exc:
            if debug:
                raise
            err.print(f"[bold red]error:[/] {exc.strerror or exc} ({getattr(exc, 'filename', '') or ''})",
                      highlight=False)
            raise typer.Exit(1)
        except Exception as exc:
            if debug:
                raise
            err.print(f"[bold red]error:[/] {type(exc).__name__}: {exc} (run with --debug for the traceback)",
                      highlight=False)
            raise typer.Exit(1)

    return wrapper




def exit_on_failed_cells(failures) -> None:
    """After the finished cells are written: one line per failed cell on stderr, then exit status 1."""
    if not failures:
        return
    for c in failures:
        err.print(f"[bold red]failed:[/] {c.method} x {c.quant}: {c.error}", highlight=False)
    err.print(f"[bold red]{len(failures)} cell(s) failed[/]; the others are written")
    raise typer.Exit(1)
