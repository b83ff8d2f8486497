"""`ser-cache slurm extract|transcribe|sweep … --array N [--submit]`: a sharded command as a Slurm job array.

The command's own options follow the Slurm ones (after `--` where one could be mistaken for the
other); they are checked here by the command's own parser before anything is written, so that a
typo fails now and not in N queued tasks. The script is infra.slurm's.
"""

from __future__ import annotations

from pathlib import Path

import typer

from ser_cache.cli.app import app, err, fail, out

slurm_app = typer.Typer(no_args_is_help=True,
                        help="Run extract, transcribe or sweep as a Slurm job array of shards (docs/cluster.md).")
app.add_typer(slurm_app, name="slurm")

_FORWARD = {"allow_extra_args": True, "ignore_unknown_options": True}


def _options(command: str):
    """The Slurm options, one signature for the three commands."""

    def run(
        ctx: typer.Context,
        array: int = typer.Option(..., "--array", metavar="N", help="Array tasks, one shard each (tasks 0..N-1)."),
        submit: bool = typer.Option(False, "--submit", help="Submit the script with sbatch (else only write it)."),
        partition: str | None = typer.Option(None, help="Slurm partition."),
        time: str | None = typer.Option(None, "--time", help="Time limit per task, e.g. 4:00:00."),
        mem: str | None = typer.Option(None, "--mem", help="Memory per task, e.g. 32G."),
        cpus_per_task: int | None = typer.Option(None, help="CPU cores per task (audio decoding uses them)."),
        gpus_per_task: int = typer.Option(0, help="GPUs per task (1 for a GPU node; torchrun inside a task "
                                                  "for more, docs/cluster.md)."),
        max_running: int | None = typer.Option(None, help="At most this many tasks at once (--array=0-N%K)."),
        job_name: str | None = typer.Option(None, help="Job name (default: ser-cache-COMMAND)."),
        sbatch: list[str] | None = typer.Option(None, "--sbatch", metavar="OPTION",
                                                help="Another sbatch option for the script, e.g. "
                                                     "--sbatch=--account=abc (repeatable)."),
        jobs_dir: Path = typer.Option(Path("slurm-jobs"), "--jobs-dir",
                                      help="Folder for the script and the tasks' logs."),
    ) -> None:
        from ser_cache.infra.slurm import ArrayJob, SlurmError, submit as submit_script, write_script

        args = tuple(ctx.args)
        _check_forwarded(command, args)
        job = ArrayJob(command=command, args=args, array=array, partition=partition, time=time, mem=mem,
                       cpus_per_task=cpus_per_task, gpus_per_task=gpus_per_task, max_running=max_running,
                       job_name=job_name, sbatch=tuple(sbatch or ()))
        try:
            job.verify()
            script = write_script(job, jobs_dir)
        except SlurmError as exc:
            fail(str(exc))
        out.print(f"script: {script}", highlight=False, soft_wrap=True)
        if not submit:
            err.print(f"submit it with: sbatch {script}", highlight=False, soft_wrap=True)
            return
        try:
            job_id = submit_script(script)
        except SlurmError as exc:
            fail(str(exc))
        out.print(f"job: {job_id}", highlight=False)
        err.print(f"{array} task(s) queued; a task that fails or is cancelled: sbatch --array=K {script}",
                  highlight=False, soft_wrap=True)

    run.__doc__ = (f"Write (and with --submit, submit) an sbatch array whose tasks run `ser-cache {command} "
                   f"OPTIONS --shard slurm`; give {command}'s options after the Slurm ones.")
    return run


def _check_forwarded(command: str, args: tuple[str, ...]) -> None:
    """Parse `args` with the command's own parser (nothing runs): unknown options, missing required ones and
    bad values fail here, with click's message."""
    import click

    if any(a == "--shard" or a.startswith("--shard=") for a in args):
        fail("--shard: the script gives every task its own (--shard slurm); leave it out")
    group = typer.main.get_command(app)
    target = group.commands[command]  # type: ignore[attr-defined]
    try:
        target.make_context(f"ser-cache {command}", list(args), resilient_parsing=False)
    except click.exceptions.Exit:
        pass  # --help among them: nothing to check
    except click.UsageError as exc:
        fail(f"{command}'s options after the Slurm ones: {exc.format_message()}")


for _command in ("extract", "transcribe", "sweep"):
    slurm_app.command(_command, context_settings=_FORWARD)(_options(_command))
