"""Thin job entrypoints: `python -m ray_jobs.<stage> --preset NAME --out DIR [--<field> VALUE ...]`.

Each parses the shared command line (`mono.cli.parse(..., init=init, check=<stage>.check)`),
calls `mono.<stage>.run(cfg)` and prints where the output went. `ray.init()` happens only
under `__main__` (`cli.main(main, PROG, init=ray.init)`), handed to `main` as `init` and
called after the arguments parse, --out is checked and the stage's `check(cfg)` passed, so
`--help`, a bad flag and a missing input answer at once: inside `ray job submit` it joins
the cluster, on a laptop it starts a local one. `cli.main` prints a user error
(mono.errors.UserError) as one line `prog: error: message`, exit status 2.
"""
