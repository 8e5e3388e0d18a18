"""``torch-ref train``: the same flags and output as ``jaxlight train``, plus ``--loader``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaxlight.cli import recipe_from_args, summary_payload, train_parser

__all__ = ["main"]


def run_train(args: argparse.Namespace) -> dict:
    import torch

    from jaxlight import report
    from torch_ref.data import make_loaders
    from torch_ref.loop import evaluate, fit
    from torch_ref.models import build_model
    from torch_ref.optim import make_optimizer
    from torch_ref.tasks import TASKS

    recipe = recipe_from_args(args)
    torch.manual_seed(recipe.seed)
    task = TASKS[recipe.task]()
    train, test, truth = make_loaders(recipe.dataset, args.loader, recipe.batch_size, recipe.seed,
                                      args.data_dir, task.label_dtype)
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
    out = Path(args.out or f"runs/torch-{recipe.model}")
    print(f"wrote {report.write_json(out / 'metrics.json', summary)}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torch-ref", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = train_parser(sub, "PyTorch")
    p.add_argument("--loader", choices=["dataloader", "memory"], default="dataloader",
                   help="dataloader: the tutorial's torchvision DataLoader; memory: tensors in memory")
    args = parser.parse_args(argv)
    from jaxlight.data import MNISTError

    try:
        run_train(args)
    except MNISTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
