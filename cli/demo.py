"""`btp-demo`: the PyTorch reference of `builtin:toy-vlm` with a two-stage pruning plan answers a question
about the bundled toy scene, showing what it kept at each stage (no compile: `make demo` compiles the same
plan and asks the same question through `btp-run`)."""

from __future__ import annotations

import argparse
import sys

from rich.columns import Columns
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from btp.cli.common import add_common, check_writable, print_json, run_main
from btp.tools.samples import TOY_ANSWER, TOY_QUESTION, toy_plan_path, toy_scene

DEMO_MODEL = "builtin:toy-vlm"
RANDOM_WEIGHTS = ("builtin:tiny-llava", "builtin:llava-bench")


def kept_map(kept: list[int], grid: tuple[int, int]) -> str:
    """The image grid as text: '#' for a kept patch, '.' for a removed one."""
    rows, cols = grid
    alive = set(kept)
    return "\n".join("".join("#" if r * cols + c in alive else "." for c in range(cols)) for r in range(rows))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="btp-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEMO_MODEL, help="model to load (default: %(default)s)")
    p.add_argument("--plan", help="plan file or preset (default: the bundled two-stage plan for builtin:toy-vlm, "
                   "btp for other models)")
    p.add_argument("--image", help="image file (default: the bundled toy scene)")
    p.add_argument("--prompt", default=TOY_QUESTION, help="question about the image (default: %(default)r)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="longest answer (default: %(default)s)")
    p.add_argument("--explain", metavar="FILE.png", help="draw the patches kept at each stage over the image")
    add_common(p, "print the answer and what each stage kept as one JSON object on stdout")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    console = Console(stderr=args.json, highlight=False)  # with --json, stdout is the result alone

    def body() -> int:
        from btp.compiler import load_model, reference_pipeline
        from btp.runtime.inputs import open_image

        if args.explain:
            check_writable(args.explain, "--explain")
        plan = args.plan or (str(toy_plan_path()) if args.model == DEMO_MODEL else "btp")
        image = open_image(args.image) if args.image else toy_scene()
        with console.status(f"loading {args.model}"):
            model = load_model(args.model)
        pipe = reference_pipeline(model, plan)
        out = pipe.generate([image], [args.prompt], max_new_tokens=args.max_new_tokens)
        answer = out.texts[0].strip()
        console.print(f"[bold]model[/bold] {args.model}   [bold]plan[/bold] {args.plan or plan}   "
                      f"[bold]image tokens[/bold] {model.image_tokens} ({model.grid[0]}x{model.grid[1]})")
        console.print(f"[bold]question[/bold] {args.prompt}")
        note, right = "", None
        if args.model in RANDOM_WEIGHTS:
            note = "  (random weights: the words mean nothing)"
        elif args.image is None and args.prompt == TOY_QUESTION:
            right = answer == TOY_ANSWER
            note = "  (right)" if right else f"  (wrong: the right answer is {TOY_ANSWER!r})"
        console.print(f"[bold]answer[/bold]   {answer}{note}")
        table = Table("stage", "first layer", "kept", "kept grid positions")
        for st, kept in zip(pipe.spec.prunes, out.kept_indices[0]):
            shown = ", ".join(map(str, kept[:24])) + (" ..." if len(kept) > 24 else "")
            table.add_row(st.prune, str(st.layers[0]), str(len(kept)), shown or "-")
        console.print(table)
        if model.grid[1] <= 32:
            maps = [Panel(kept_map(kept, model.grid), title=f"{st.prune}: {len(kept)} kept", expand=False)
                    for st, kept in zip(pipe.spec.prunes, out.kept_indices[0])]
            console.print(Columns(maps))
        avg = pipe.plan.average_image_tokens()
        console.print(f"layer-averaged image tokens: {avg:.2f} of {model.image_tokens} "
                      f"({100 * (1 - avg / model.image_tokens):.0f}% removed); time to first token "
                      f"{out.timings['ttft_ms']:.1f} ms")
        if args.explain:
            from btp.tools.explain import explain_figure, image_grid

            titles = [s.prune for s in pipe.spec.prunes]
            explain_figure(image, out.kept_indices[0], image_grid(pipe.processor, image, pipe.spec.grid), titles,
                           args.explain)
            console.print(f"wrote {args.explain}")
        if args.json:
            print_json({"model": args.model, "plan": args.plan or plan, "prompt": args.prompt, "answer": answer,
                        "right": right, "image_tokens": model.image_tokens, "grid": list(model.grid),
                        "stages": [{"prune": st.prune, "first_layer": st.layers[0], "kept": kept}
                                   for st, kept in zip(pipe.spec.prunes, out.kept_indices[0])],
                        "layer_averaged_image_tokens": avg, "timings": out.timings})
        return 0

    return run_main(body, args.debug, "btp-demo", options=vars(args))


if __name__ == "__main__":
    sys.exit(main())
