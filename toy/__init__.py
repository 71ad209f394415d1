"""The builtin models (`builtins.py`: random-weight stand-ins and the trained `toy-vlm`, whose weights ship in
`data/`), the toy shapes task they are judged on (`task.py`, also the `builtin` calibration scenes), and the
trainer of `toy-vlm` (`training.py`, `trainer.py`), which nothing in the compiler or runtime imports."""
