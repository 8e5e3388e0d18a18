"""``torch-ref train``: the same flags, output and exit codes as ``jaxlight train``, plus ``--loader``
and ``--torch-threads`` (as ``jaxlight compare``'s: ``torch.set_num_threads`` for the run).

torch-ref has no checkpoints: SIGINT and SIGTERM stop it at once (exit 130 / 143) with one
line saying so, through its own handlers (``jaxlight.cli.install_signal_handlers``), also when
it was started with SIGINT ignored (``nohup torch-ref train &``); the rest of the failure
handling is ``jaxlight.cli``'s (docs/reliability.md).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from jaxlight.cli import (EXIT_DIVERGED, EXIT_FAILED, EXIT_USAGE, UsageError, install_signal_handlers, log_details,
                          prepare_outputs, recipe_from_args, restore_signal_handlers, run_cli,
                          summary_payload, train_parser, warn_batch_size)

if TYPE_CHECKING:
    import argparse

__all__ = ["main"]


def run_train(args: argparse.Namespace) -> dict:
    if args.torch_threads is not None and args.torch_threads < 1:
        raise UsageError(f"--torch-threads must be >= 1, got {args.torch_threads}")
    recipe = recipe_from_args(args)
    out = prepare_outputs(args, "torch")  # before any data loads: a bad --out fails in a second
    args.log_file = log_details(out, args.verbose)
    import torch

    from jaxlight import report
    from torch_ref.data import make_loaders
    from torch_ref.loop import evaluate, fit
    from torch_ref.models import build_model
    from torch_ref.optim import make_optimizer
    from torch_ref.tasks import TASKS

    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    torch.manual_seed(recipe.seed)
    task = TASKS[recipe.task]()
    train, test, truth = make_loaders(recipe.dataset, args.loader, recipe.batch_size, recipe.seed,
                                      args.data_dir, task.label_dtype)
    warn_batch_size(recipe.batch_size, len(train.dataset) if hasattr(train, "dataset") else len(train.x))
    model = build_model(recipe.model, recipe.seed)
    optimizer = make_optimizer(recipe.optimizer, model.parameters(), recipe.lr, **recipe.optimizer_kwargs())
    print(f"torch-ref: {recipe.model} on {recipe.dataset}, {recipe.optimizer} lr {recipe.lr}, "
          f"batch {recipe.batch_size}, {recipe.epochs} epochs, loader {args.loader}, "
          f"{torch.get_num_threads()} threads", flush=True)
    results = fit(model, optimizer, train, task, recipe.epochs,
                  on_epoch=lambda r: print(report.epoch_line(r.epoch, recipe.epochs, r.metrics, r.seconds), flush=True),
                  progress=report.progress_bar(recipe.epochs))
    test_metrics = evaluate(model, test, task)
    extra = {"device": "cpu", "backend": "cpu", "loader": args.loader}
    if truth:
        extra["weight_error"] = float((model.linear.weight.detach().numpy().T - truth["weight"]).__abs__().max())
        extra["bias_error"] = float((model.linear.bias.detach().numpy() - truth["bias"]).__abs__().max())
    summary = summary_payload("torch", recipe, results, test_metrics,
                              report.library_versions("torch", "torchvision", "numpy"), extra)
    print(report.final_line(summary))
    print(f"wrote {report.write_json(out / 'metrics.json', summary)}")
    return summary


def main(argv: list[str] | None = None) -> int:
    previous = install_signal_handlers("torch-ref")
    try:
        return _main(argv)
    finally:
        restore_signal_handlers(previous)


def _main(argv: list[str] | None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="torch-ref", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = train_parser(sub, "PyTorch")
    p.add_argument("--loader", choices=["dataloader", "memory"], default="dataloader",
                   help="dataloader: the tutorial's torchvision DataLoader; memory: tensors in memory")
    p.add_argument("--torch-threads", type=int, help="torch.set_num_threads for the run (default: torch's)")
    args = parser.parse_args(argv)  # (exits 2 on a malformed flag)
    from jaxlight.checkpoint import CheckpointError
    from jaxlight.data import MNISTError

    return run_cli("torch-ref", run_train, args, {
        FloatingPointError: EXIT_DIVERGED,  # (torch_ref.loop.NonFiniteLossError; importing it imports torch)
        OSError: EXIT_FAILED,
        UsageError: EXIT_USAGE, MNISTError: EXIT_USAGE,
        CheckpointError: EXIT_USAGE,  # (the --out folder is locked by another run)
    })


if __name__ == "__main__":
    sys.exit(main())
