"""`aurora-sweep data ...`: get ERA5 into the local store.

Two ways in: `download` asks the Climate Data Store for what a study needs (resumable), `import`
reads CDS NetCDF files or zips the user already has. Both end with the canonical store that every
other command reads. Heavy modules are imported inside the commands so `--help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer

from aurora_sweep.errors import AuroraSweepError

data_app = typer.Typer(
    help="Get ERA5 data from the Climate Data Store (or files you have) into the local store.",
    no_args_is_help=True,
)

ConfigOption = typer.Option(
    None, "--config", "-c", help="Study config (TOML); default: the embedded demo study."
)
FilesArgument = typer.Argument(
    ..., help="CDS NetCDF files, zips or folders holding them (any order, overlaps allowed)."
)


def fail(error: AuroraSweepError) -> None:
    from rich.console import Console
    from rich.markup import escape

    # escaped: messages name config sections such as [data.region], which are not markup
    Console(stderr=True).print(
        f"[red]error: {escape(str(error))}[/red]", markup=True, highlight=False, soft_wrap=True
    )
    raise typer.Exit(1)


@data_app.command("download")
def download_command(
    config: Path | None = ConfigOption,
    workers: int = typer.Option(4, "--workers", "-j", min=1, help="Requests in flight at once."),
    max_fields: int = typer.Option(
        6000, "--max-fields", min=1, help="Largest request, in fields; lower it if the CDS refuses."
    ),
    retries: int = typer.Option(5, "--retries", min=0, help="Tries per chunk on transient errors."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the plan and its size; fetch nothing."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Download the study's ERA5 from the CDS (resumable), then build the store."""
    from rich.console import Console

    from aurora_sweep.config.study_file import load_config
    from aurora_sweep.data import era5

    try:
        study = load_config(config)
        console = Console()
        if dry_run:
            plan = era5.plan_requests(study, max_fields=max_fields)
            console.print(era5.describe_plan(study))
            console.print(f"download folder: {era5.download_folder(study.data)}")
            for r in plan[:5]:
                console.print(f"  {r.target}: {r.dataset}, {r.fields} fields")
            if len(plan) > 5:
                console.print(f"  ... and {len(plan) - 5} more")
            return
        path = era5.download(
            study, max_workers=workers, progress=progress, retries=retries, max_fields=max_fields
        )
        console.print(f"store ready at {path}")
    except AuroraSweepError as e:
        fail(e)
    except era5.DownloadInterrupted as e:
        Console(stderr=True).print(str(e), highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None


@data_app.command("import")
def import_command(
    files: list[Path] = FilesArgument,
    config: Path | None = ConfigOption,
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Build the store from CDS files you already have."""
    from rich.console import Console

    from aurora_sweep.config.study_file import load_config
    from aurora_sweep.data import era5

    try:
        study = load_config(config)
        path = era5.import_files(files, study.data, progress=progress)
        Console().print(f"store ready at {path}")
    except AuroraSweepError as e:
        fail(e)
