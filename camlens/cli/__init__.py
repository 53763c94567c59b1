"""The ``camlens`` command line. Each sub-command lives in its own module and is imported lazily,
so ``camlens --help`` is fast and one broken command cannot break the others."""

from __future__ import annotations

import importlib
import os

import click

#: sub-command name -> "module:attribute" (modules under camlens.cli)
COMMANDS = {
    "explain": "explain:explain_cmd",
    "localize": "localize:localize_cmd",
    "models": "info:models_cmd",
    "methods": "info:methods_cmd",
    "layers": "info:layers_cmd",
    "finetune": "finetune:finetune_cmd",
    "evaluate": "evaluate:evaluate_cmd",
    "compare": "compare:compare_cmd",
    "bench": "bench:bench_cmd",
    "serve": "serve:serve_cmd",
    "show": "show:show_cmd",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(n for n in COMMANDS if self._load(n) is not None)

    def get_command(self, ctx, name):
        return self._load(name)

    def invoke(self, ctx):
        from camlens.base.errors import WriteError  # light: no torch

        try:
            try:
                return super().invoke(ctx)
            except WriteError as exc:  # a full disk, a read-only or unusable --out: the cause, no traceback
                raise click.ClickException(str(exc)) from None
        except click.ClickException as exc:
            rank = launcher_rank()
            if rank is None:
                raise
            # under torchrun every rank meets the same refusal: rank 0 says it once, the others are
            # silent, and every rank keeps the error's status (a script chained with && must stop;
            # torchrun then adds its own ChildFailedError summary, which the line below explains)
            if rank == 0:
                exc.show()
                click.echo("(torchrun: said once, by rank 0; every rank stopped with this error)", err=True)
            ctx.exit(exc.exit_code)

    @staticmethod
    def _load(name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        mod, attr = target.split(":")
        try:
            module = importlib.import_module(f"camlens.cli.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name == f"camlens.cli.{mod}":
                return None
            raise
        return getattr(module, attr)


def launcher_rank() -> int | None:
    """This process's rank under ``torchrun`` (``WORLD_SIZE`` > 1), else None."""
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return int(os.environ.get("RANK", "0"))
    except ValueError:
        pass
    return None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="camlens")
def main() -> None:
    """camlens: where does a CNN look when it decides?"""
    from camlens.base._malloc import tune_malloc  # light: ctypes only

    tune_malloc()  # this process is camlens': the allocator settings CPU tensor work wants


if __name__ == "__main__":  # pragma: no cover
    main()
