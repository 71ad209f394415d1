"""`btp-train-toy`: train `builtin:toy-vlm` on the toy shapes task and save it with `save_pretrained`.

The trainer (`btp.toy.trainer`) runs two phases, seeded and deterministic for a given thread count: a vision
warm-up (`--vision-steps`) that teaches every image token to say what and where it shows, then everything on
the answers' loss with auxiliary read-outs (`--aux`, `--object-aux`, `--count-aux`, `--colour-aux`). At the
end: exact-match accuracy of greedy `generate` on the fixed test split, per question kind, then model and
processor saved (safetensors) with a `training.json` of the run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from btp.cli.common import add_common, check_writable, print_json, run_main, stdout_to_stderr
from btp.runtime.errors import InputError
from btp.toy import task as toy_task
from btp.toy.trainer import train_and_save
from btp.toy.training import BUILTIN


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="btp-train-toy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--out", type=Path, required=True, help="directory for save_pretrained (model + processor)")
    p.add_argument("--steps", type=int, default=1800, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch", type=int, default=16, help="samples per step; each train sample is seen once")
    p.add_argument("--turns", type=int, default=8,
                   help="questions per training image: the sample's own, then more about the same scene as "
                        "further chat turns (default: %(default)s)")
    p.add_argument("--no-describe", action="store_true",
                   help="no scene-description turns among the extra turns")
    p.add_argument("--curriculum", type=float, default=0.0,
                   help="fraction of the steps over which scenes grow from 1 object to all of theirs, objects "
                        "that the answer needs always kept (default: %(default)s)")
    p.add_argument("--vision-steps", type=int, default=300,
                   help="phase 1: steps of the vision tower and projector alone on the patch labels (default: "
                        "%(default)s; 0 skips it)")
    p.add_argument("--vision-batch", type=int, default=64, help="images per phase-1 step (default: %(default)s)")
    p.add_argument("--vision-lr", type=float, default=3e-3, help="phase-1 peak learning rate")
    p.add_argument("--aux", type=float, default=0.5,
                   help="weight of the patch-label loss in phase 2 (default: %(default)s; 0 drops it)")
    p.add_argument("--object-aux", type=float, default=0.5,
                   help="weight of the object read-out loss: the cell of each object a question names, read at its "
                        "shape word after text layer --object-layer (default: %(default)s; 0 drops it)")
    p.add_argument("--count-aux", type=float, default=0.25,
                   help="weight of the count read-out loss: a count question's answer, read at the counted word "
                        "after text layer --object-layer (default: %(default)s; 0 drops it)")
    p.add_argument("--colour-aux", type=float, default=0.5,
                   help="weight of the colour read-out loss: at the shape word of a named object, the colour word "
                        "before it, after text layer --colour-layer (default: %(default)s; 0 drops it)")
    p.add_argument("--object-layer", type=int, default=3,
                   help="text layer the cell and count read-outs follow (1-based, default: %(default)s)")
    p.add_argument("--colour-layer", type=int, default=1,
                   help="text layer the colour read-out follows (1-based, default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: %(default)s)")
    p.add_argument("--warmup", type=float, default=0.05, help="warm-up fraction of the steps")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    p.add_argument("--test-samples", type=int, default=toy_task.TEST_SIZE,
                   help="test-split samples for the final accuracy (default: all %(default)s)")
    p.add_argument("--eval-every", type=int, default=0, help="report accuracy on a test subset every N steps")
    p.add_argument("--eval-samples", type=int, default=120, help="test subset size for --eval-every")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_common(p, "print the run's record (training.json) as one JSON object on stdout")
    args = p.parse_args(argv)
    console = Console(stderr=args.json)  # with --json, stdout is the result alone

    def body() -> int:
        _check_args(args)
        check_writable(args.out, "--out", directory=True, parents=True)
        with stdout_to_stderr(args.json):
            record = train_and_save(args, argv, console)
        if args.json:
            print_json({"out": str(args.out), **record})
        return 0

    return run_main(body, args.debug, "btp-train-toy", options=vars(args))


def _check_args(args) -> None:
    """`InputError` for settings out of range, before any training."""
    if min(args.steps, args.batch, args.turns, args.threads, args.test_samples, args.vision_batch) < 1:
        raise InputError("--steps, --batch, --turns, --threads, --test-samples and --vision-batch must be >= 1")
    counts = {"--vision-steps": args.vision_steps, "--aux": args.aux, "--object-aux": args.object_aux,
              "--count-aux": args.count_aux, "--colour-aux": args.colour_aux}
    if bad := {k: v for k, v in counts.items() if v < 0}:
        raise InputError(f"{', '.join(counts)} must be >= 0, got {bad}")
    from btp.toy.builtins import BUILTINS

    layers = BUILTINS[BUILTIN].layers
    if not (1 <= args.object_layer <= layers and 1 <= args.colour_layer <= layers):
        raise InputError(f"--object-layer and --colour-layer name a text layer, 1 to {layers}; got "
                         f"{args.object_layer} and {args.colour_layer}")
    if args.test_samples > toy_task.TEST_SIZE or args.eval_samples > toy_task.TEST_SIZE:
        raise InputError(f"the test split has {toy_task.TEST_SIZE} samples, got --test-samples {args.test_samples} "
                         f"and --eval-samples {args.eval_samples}")


if __name__ == "__main__":
    sys.exit(main())
