"""`make demo`: the PyTorch reference of a builtin model with a BTP plan answers a question about the
bundled sample image, showing what it kept at each stage."""

from __future__ import annotations

import argparse
import sys

from rich.columns import Columns
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from btp.runtime.errors import BtpError

from .samples import SAMPLE_QUESTION, sample_image


def kept_map(kept: list[int], grid: tuple[int, int]) -> str:
    """The image grid as text: '#' for a kept patch, '.' for a removed one."""
    rows, cols = grid
    alive = set(kept)
    return "\n".join("".join("#" if r * cols + c in alive else "." for c in range(cols)) for r in range(rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="btp-demo", description=__doc__)
    parser.add_argument("--model", default="builtin:tiny-llava", help="model to load (default: %(default)s)")
    parser.add_argument("--plan", default="btp", help="plan file or preset (default: %(default)s)")
    parser.add_argument("--prompt", default=SAMPLE_QUESTION, help="question about the sample image")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    console = Console()
    err = Console(stderr=True)
    try:
        from btp.compiler import load_model, reference_pipeline

        with console.status(f"loading {args.model}"):
            model = load_model(args.model)
        pipe = reference_pipeline(model, args.plan)
        out = pipe.generate([sample_image()], [args.prompt], max_new_tokens=args.max_new_tokens)
    except BtpError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        return 2
    plan = pipe.plan
    console.print(f"[bold]model[/bold] {args.model}   [bold]plan[/bold] {args.plan}   "
                  f"[bold]image tokens[/bold] {model.image_tokens} ({model.grid[0]}x{model.grid[1]})")
    console.print(f"[bold]question[/bold] {args.prompt}")
    console.print(f"[bold]answer[/bold]   {out.texts[0]!r}  (random weights: the words mean nothing)")
    table = Table("stage", "first layer", "kept", "kept grid positions")
    for st, kept in zip(pipe.spec.prunes, out.kept_indices[0]):
        shown = ", ".join(map(str, kept[:24])) + (" ..." if len(kept) > 24 else "")
        table.add_row(st.prune, str(st.layers[0]), str(len(kept)), shown or "-")
    console.print(table)
    if model.grid[1] <= 32:
        maps = [Panel(kept_map(kept, model.grid), title=f"{st.prune}: {len(kept)} kept", expand=False)
                for st, kept in zip(pipe.spec.prunes, out.kept_indices[0])]
        console.print(Columns(maps))
    avg = plan.average_image_tokens()
    console.print(f"layer-averaged image tokens: {avg:.2f} of {model.image_tokens} "
                  f"({100 * (1 - avg / model.image_tokens):.0f}% removed); time to first token "
                  f"{out.timings['ttft_ms']:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
