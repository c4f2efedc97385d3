"""The tail every table benchmark shares: parse, show progress, run, print the table, keep the JSON if asked."""
from __future__ import annotations

import json
import logging
import pathlib
import sys


def run_main(parser, argv, run, print_table) -> int:
    """Parse `argv` (None: the command line) with `parser`, call `run(args)` -> result dict, print it with
    `print_table(result)`, and write it to `args.json` when the parser has that option and it was given."""
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    # force: under `facepq bench` the CLI has configured logging already (warnings only), and a benchmark's
    # progress lines are INFO: without force this call would change nothing and they would not show.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        force=True)
    result = run(args)
    print_table(result)
    if getattr(args, "json", None):
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
    return 0
