"""The `btp-*` command lines, one thin module each: parse the options, make one library call, print a table or
`--json`, all through `btp.cli.common.run_main` (exit codes 0 ok, 1 a check or target failed, 2 bad input,
3 internal error). The work itself lives in `btp.compiler`, `btp.tools` and `btp.toy`."""
