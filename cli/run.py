"""`btp-run OUT --image PATH --prompt TEXT`: answer a question about an image with a compiled artifact."""

from __future__ import annotations

import argparse
import sys

from btp.cli.common import add_common, check_writable, print_json, run_main
from btp.runtime import Pipeline
from btp.runtime.inputs import check_prompt_text, open_image
from btp.tools.explain import image_grid


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="btp-run", description=__doc__)
    p.add_argument("artifact", help="artifact directory written by btp-compile")
    p.add_argument("--image", required=True, help="image file (any format Pillow reads)")
    p.add_argument("--prompt", required=True, help="question; wrapped in the model's chat template unless it "
                   "already holds the <image> placeholder")
    p.add_argument("--max-new-tokens", type=int, help="longest answer (default: 64, or the artifact's bound if lower)")
    p.add_argument("--backend", default="auto", help="auto, onnxruntime or tensorrt (default: auto: TensorRT engines "
                   "where the artifact has them and tensorrt imports, else ONNX Runtime)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu; TensorRT engines run on cuda)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = its choice)")
    p.add_argument("--explain", metavar="FILE.png", help="draw the patches kept at each stage over the image")
    add_common(p, "print one JSON object instead of streaming text")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        if args.explain:
            check_writable(args.explain, "--explain")
        check_prompt_text(args.prompt, "--prompt")  # bad input fails before the artifact is loaded
        image = open_image(args.image)
        pipe = Pipeline.load(args.artifact, backend=args.backend, device=args.device, threads=args.threads)
        bound = pipe.manifest.build.max_new_tokens
        new_tokens = args.max_new_tokens if args.max_new_tokens is not None else min(64, bound)
        if args.json:
            out = pipe.generate([image], [args.prompt], max_new_tokens=new_tokens)
            doc = {"text": out.texts[0], "token_ids": out.token_ids[0],
                   "kept_indices": {s.prune: k for s, k in zip(pipe.spec.prunes, out.kept_indices[0])},
                   "timings": out.timings}
            print_json(doc)
            kept = out.kept_indices[0]
        else:
            stream = pipe.stream(image, args.prompt, max_new_tokens=new_tokens)
            started = False
            for piece in stream:
                if not started:  # the answer's first token usually carries the space after "ASSISTANT:"
                    piece = piece.lstrip()
                    started = bool(piece)
                print(piece, end="", flush=True)
            print()
            kept = stream.kept_indices
            grid = image_grid(pipe.processor, image, pipe.spec.grid)  # the image's own grid where sizes vary
            n0 = grid[0] * grid[1]
            summary = ", ".join(f"{s.prune} {len(k)}" for s, k in zip(pipe.spec.prunes, kept)) or "none"
            print(f"image tokens kept (of {n0}): {summary}", file=sys.stderr)
        if args.explain:
            from btp.tools.explain import explain_figure

            titles = [s.prune for s in pipe.spec.prunes]
            explain_figure(image, kept, image_grid(pipe.processor, image, pipe.spec.grid), titles, args.explain)
            print(f"wrote {args.explain}", file=sys.stderr)
        return 0

    return run_main(body, args.debug, "btp-run", options=vars(args))


if __name__ == "__main__":
    sys.exit(main())
